"""Sparse MLA on Hopper in Pallas Mosaic GPU: rows gathered by ``cp.async``, scores and output by wgmma.

Computes what ``pallas_kernels.sparse_mla_gpu`` (Pallas Triton) computes -- for every query t and head h,
over the rows idx[t] selects (-1: an unused slot)

  o[t, h] = sum_j softmax_j(scale * (q_lat[t,h] . kv[idx[t,j]] + q_pe[t,h] . k_pe[idx[t,j]])) kv[idx[t,j]]

-- with the FlashMLA division of labour. EXPERIMENTAL, not behind the dispatch: correct (the GPU test), but on
an H100 153 / 90 TFLOP/s at 4K / 128K against the Triton kernel's 222 / 218 (BENCHMARKS.md: the two-slot
ring exposes each tile's gather latency, and both consumers compute the scores). A CTA owns one query and
64 heads and runs three warpgroups:

- the producer gathers tiles of 64 selected rows (latent 512 + rope 64 = 576 bf16 values a row) into a
  ring of shared-memory slots: its 128 threads each issue 16-byte ``cp.async`` copies straight to their
  places in wgmma's 128-byte-swizzled (8, 64) tiling (Pallas Mosaic GPU's own copies cannot gather on
  Hopper; ``benchmarks/gather_rows_mgpu.py``), keeping two tiles in flight;
- two consumers each compute the scores S = [q_lat | q_pe] . [kv | k_pe]^T of the 64 heads against the
  tile (one wgmma over 576; both compute it, so that neither waits on the other) and the online softmax,
  and fold P into their half of the 512 output columns (a 64 x 256 float32 accumulator each: all 512
  would not fit one warpgroup's registers).

Tiles past a query's last valid slot are not gathered. Needs 128-byte-aligned rows: c + r = 576 here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from dsv32_jax.mla import sparse_attention_scaled as reference  # noqa: F401  (what this kernel matches)

HEADS = 64       # heads a CTA (the wgmma M dimension)
BLOCK_K = 64     # selected rows a tile (the output wgmma's K: a multiple of 64 with the 128-byte swizzle)
PIECE = 16       # bytes a cp.async copies


@dataclasses.dataclass(frozen=True)
class SparseMlaMgpuConfig:
  """Tiling of the Mosaic GPU sparse MLA kernel."""

  slots: int = 2                # gathered tiles in shared memory (the ring); 2 x 72 KiB is what fits beside
                                # the queries (72 KiB) with 576-wide rows


def _tiled(shape):
  return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _gather_tile(kv_rows, idx_smem, ring_raw, tile, row0, slot, width: int):
  """The producer's 128 threads copy the 64 rows row0 + max(idx_smem[tile, j], 0) of kv_rows [N, width] bf16
  (-1 slots read row0; their scores are masked) into slot
  ``slot`` of ring_raw (the raw bytes of a [slots, 64, width] ref tiled (8, 64), swizzled by 128 bytes):
  row r's 16-byte piece p goes to ((r // 8) * (width // 64) + p // 8) * 1024 + (r % 8) * 128
  + ((p % 8) ^ (r % 8)) * 16 in the slot. Commits them as one cp.async group."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm
  from jax.experimental.mosaic.gpu import utils as mu
  pieces = width * 2 // PIECE
  col_tiles = width // 64
  slot_bytes = BLOCK_K * width * 2

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(), plgpu.Layout.WG_SPLAT,
                                plgpu.Layout.WG_SPLAT, plgpu.Layout.WG_SPLAT))
  def gather(ctx, kv, idx, dst, tile, row0, slot):
    del ctx
    tile, row0, slot = (a.registers.item() for a in (tile, row0, slot))
    i32, i64, i8 = (ir.IntegerType.get_signless(n) for n in (32, 64, 8))
    bf16, index = ir.BF16Type.get(), ir.IndexType.get()
    c32 = lambda v: arith.constant(i32, v)
    tid = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), c32(128))
    kv_ptr = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mu.memref_ptr(kv))
    slot_ptr = mu.getelementptr(mu.memref_ptr(dst), [arith.muli(slot, c32(slot_bytes))], i8)
    for it in range(BLOCK_K * pieces // 128):
      lin = arith.addi(tid, c32(it * 128))
      row, piece = arith.divui(lin, c32(pieces)), arith.remui(lin, c32(pieces))
      r = arith.addi(row0, arith.maxsi(memref.load(idx, [arith.index_cast(index, tile), arith.index_cast(index, row)]),
                                       c32(0)))
      src = arith.addi(arith.muli(arith.extui(i64, r), arith.constant(i64, width)),
                       arith.extui(i64, arith.muli(piece, c32(PIECE // 2))))
      ri, rg = arith.remui(row, c32(8)), arith.divui(row, c32(8))
      tile_of = arith.addi(arith.muli(rg, c32(col_tiles)), arith.divui(piece, c32(8)))
      dst_off = arith.addi(arith.addi(arith.muli(tile_of, c32(1024)), arith.muli(ri, c32(128))),
                           arith.muli(arith.xori(arith.remui(piece, c32(8)), ri), c32(PIECE)))
      nvvm.cp_async_shared_global(mu.getelementptr(slot_ptr, [dst_off], i8), mu.getelementptr(kv_ptr, [src], bf16),
                                  PIECE, nvvm.LoadCacheModifierKind.CG)
    nvvm.cp_async_commit_group()

  gather(kv_rows, idx_smem, ring_raw, tile, row0, slot)


def _wait_gathers(pending: int):
  """Waits until at most ``pending`` of this thread's cp.async groups are in flight."""
  from jax._src.lib.mlir.dialects import nvvm

  @plgpu.inline_mgpu()
  def wait(ctx):
    del ctx
    nvvm.cp_async_wait_group(pending)

  wait()


def sparse_mla_mgpu(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
                    k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float,
                    config: SparseMlaMgpuConfig = SparseMlaMgpuConfig()) -> Float[Array, "b s h c"]:
  """Sparse MLA output [B, S, H, c] in bf16 (a query with no valid slot gets zeros). bf16 operands."""
  b, s, h, c = q_lat.shape
  r, t, k = q_pe.shape[-1], kv.shape[1], idx.shape[-1]
  width = c + r
  if kv.shape != (b, t, c) or k_pe.shape != (b, t, r) or q_pe.shape != (b, s, h, r) or idx.shape[:2] != (b, s):
    raise ValueError(f"sparse_mla_mgpu: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, kv {kv.shape}, "
                     f"k_pe {k_pe.shape}, idx {idx.shape} do not agree")
  if width % 64 or c % 128:
    raise ValueError(f"sparse_mla_mgpu: latent {c} must be a multiple of 128 and latent + rope {width} of 64")
  if any(a.dtype != jnp.bfloat16 for a in (q_lat, q_pe, kv, k_pe)):
    raise TypeError("sparse_mla_mgpu takes bf16 operands")
  h_pad, k_pad = -(-h // HEADS) * HEADS, -(-k // BLOCK_K) * BLOCK_K
  n_q, half = b * s, c // 2
  q = jnp.concatenate([q_lat, q_pe], axis=-1).reshape(n_q, h, width)
  q = jnp.pad(q, ((0, 0), (0, h_pad - h), (0, 0)))
  rows_all = jnp.concatenate([kv, k_pe], axis=-1).reshape(b * t, width)
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, k_pad - k)), constant_values=-1)
  idx = jnp.where((idx >= 0) & (idx < t), idx, -1).astype(jnp.int32).reshape(n_q, k_pad)
  slots_ = jnp.arange(1, k_pad + 1, dtype=jnp.int32)
  live_tiles = -(-jnp.max(jnp.where(idx >= 0, slots_, 0), axis=-1) // BLOCK_K)  # [n_q]
  n_slots = config.slots
  log2e = math.log2(math.e)

  def kernel(q_gmem, rows_all_gmem, idx_gmem, live_gmem, out_gmem, q_and_out, idx_smem, ring, q_barrier,
             full, empty, done):
    q_smem, o_smem = q_and_out  # the output halves reuse the queries' bytes once both consumers are done
    ring_raw, ring_tiled = ring
    hb, qi = lax.axis_index("hb"), lax.axis_index("q")
    wg = lax.axis_index("wg")
    live = live_gmem[qi]

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(q_gmem.at[qi, pl.ds(hb * HEADS, HEADS)], q_smem, q_barrier.at[wg])
      plgpu.copy_gmem_to_smem(idx_gmem.at[qi], idx_smem, q_barrier.at[wg])
      plgpu.barrier_wait(q_barrier.at[wg])
      cols = pl.ds(wg * half, half)

      def tile_step(j, carry):
        acc, m, l = carry
        slot = lax.rem(j, n_slots)
        plgpu.barrier_wait(full.at[slot])

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, ring_tiled.at[slot].T)
          return acc_ref[...]
        sc = pl.run_scoped(scores, plgpu.ACC((HEADS, BLOCK_K), jnp.float32))
        valid = idx_smem[j] >= 0
        sc = jnp.where(lax.broadcast_in_dim(valid, (HEADS, BLOCK_K), [1]), sc * (scale * log2e), -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no valid slot yet: nothing to rescale
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def output(acc_ref):
          plgpu.wgmma(acc_ref, p.astype(jnp.bfloat16), ring_tiled.at[slot, :, cols])
        acc = pl.run_state(output)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(empty.at[slot])
        return acc, m_new, l

      acc = plgpu.layout_cast(jnp.zeros((HEADS, half), jnp.float32), plgpu.Layout.WGMMA)
      m = plgpu.layout_cast(jnp.full((HEADS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc, m, l = lax.fori_loop(0, live, tile_step, (acc, m, l))
      norm = jnp.where(l > 0, l, 1.0)
      out = acc / lax.broadcast_in_dim(norm, acc.shape, [0])
      plgpu.barrier_arrive(done)  # both consumers are past their last read of q_smem
      plgpu.barrier_wait(done)
      o_smem.at[wg][...] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[qi, pl.ds(hb * HEADS, HEADS), cols])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      row0 = (qi // s) * t  # the query's sequence's first row in rows_all
      plgpu.barrier_wait(q_barrier.at[0])  # the query's indices are in idx_smem

      @pl.loop(0, live)
      def _(j):
        slot = lax.rem(j, n_slots)

        @pl.when(j >= n_slots)
        def _():
          plgpu.barrier_wait(empty.at[slot])
        _gather_tile(rows_all_gmem, idx_smem, ring_raw, j, row0, slot, width)

        @pl.when(j >= 1)
        def _():  # the previous tile has landed: hand it over
          _wait_gathers(1)
          plgpu.commit_smem()
          plgpu.barrier_arrive(full.at[lax.rem(j - 1, n_slots)])

      @pl.when(live >= 1)
      def _():
        _wait_gathers(0)
        plgpu.commit_smem()
        plgpu.barrier_arrive(full.at[lax.rem(live - 1, n_slots)])

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.RefUnion(_tiled((HEADS, width)), _tiled((2, HEADS, half))),
        plgpu.SMEM((k_pad // BLOCK_K, BLOCK_K), jnp.int32),  # a TMA box holds at most 256 values a dimension
        plgpu.RefUnion(plgpu.SMEM((n_slots * BLOCK_K * width,), jnp.bfloat16), _tiled((n_slots, BLOCK_K, width))),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_barriers=n_slots),
        plgpu.Barrier(num_arrivals=2, num_barriers=n_slots),
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((n_q, h_pad, c), jnp.bfloat16),
      grid=(h_pad // HEADS, n_q),
      grid_names=("hb", "q"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(q, rows_all, idx.reshape(n_q, k_pad // BLOCK_K, BLOCK_K), live_tiles.astype(jnp.int32))
  return out[:, :h].reshape(b, s, h, c)
