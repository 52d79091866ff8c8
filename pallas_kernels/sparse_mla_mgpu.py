"""Sparse MLA on Hopper in Pallas Mosaic GPU: rows gathered by ``cp.async``, scores and output by wgmma.

Computes what ``pallas_kernels.sparse_mla_gpu`` (Pallas Triton) computes -- for every query t and head h,
over the rows idx[t] selects (-1: an unused slot)

  o[t, h]   = sum_j softmax_j(scale * s_j) kv[idx[t,j]],   s_j = q_lat[t,h] . kv[idx[t,j]] + q_pe[t,h] . k_pe[idx[t,j]]
  lse[t, h] = log sum_j exp(scale * s_j)

-- with FlashMLA's division of labour for sparse prefill. A CTA owns one query, 64 heads (wgmma's M) and a
range of the query's top-k slots, and runs three warpgroups over pairs of 64-row tiles:

- the producer gathers the pair's rows (latent 512 + rope 64 = 576 bf16 values a row) into two shared-
  memory tiles, even tile -> slot 0, odd tile -> slot 1. Its 128 threads issue 16-byte ``cp.async`` copies
  straight to their places in wgmma's 128-byte-swizzled (8, 64) tiling (Pallas Mosaic GPU's own copies
  cannot gather on Hopper; ``benchmarks/gather_rows_mgpu.py``). Each tile arrives, and is released, in two
  halves -- left = latent columns [0, 256), right = [256, 576) -- in the order the consumers need them
  (slot 0 left, slot 1 right, slot 0 right, slot 1 left, as FlashMLA). The producer issues a half as soon
  as its ``free`` barrier says the consumers are done with it and never waits for its own copies: they
  complete the half's raw ``ready`` mbarrier themselves (``cp.async.mbarrier.arrive.noinc``).
- consumer w (0 or 1) computes the scores of tile w only (S_w = [q_lat | q_pe] . tile_w^T, one wgmma over
  576) and owns output columns [256 w, 256 w + 256) (a 64 x 256 float32 accumulator: all 512 would not fit
  one warpgroup's registers). The two share a running maximum through shared memory -- consumer 0 posts
  m0 = max(m, rowmax S_0), consumer 1 answers m1 = max(m0, rowmax S_1) -- and each multiplies its
  probabilities P_w = exp(S_w - m) into the values of both tiles: its own P_w from registers, the other's
  from shared memory (P_0 in slot 0's rope columns, which nothing reads after consumer 0's scores; P_1 in
  a buffer of its own). No score is computed twice. These four hand-overs a pair go through hardware
  named barriers (``bar.arrive`` / ``bar.sync``), as FlashMLA's: against mbarriers, decode at batch 32-128
  ran 6-7% faster, prefill from 5.8% slower to 2.3% faster over four cases (one sample each; H200,
  BENCHMARKS.md).

Registers: consumers 232, producer 40 a thread (``SparseMlaMgpuConfig.registers``; FlashMLA's 216/72 measured
slower here). ptxas still spills ~0.5 KiB a thread in consumer 0, which overlaps its next tile's scores with
this tile's output wgmma; every variant that cut the spills (no overlap, a per-consumer epilogue) was slower.

Top-k splits (flash-decoding, for small batches): each CTA returns its normalised partial output and its
log-sum-exp, merged by ``sparse_mla_gpu.merge_splits``. Tiles past a query's last valid slot are not
gathered. The inline ``cp.async`` code cannot run in interpret mode: the CPU tests lower the kernel for an
H100, the GPU tests check its numerics.
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
from pallas_kernels.sparse_mla_gpu import NUM_SMS, count_live_tiles, merge_splits

HEADS = 64       # heads a CTA (the wgmma M dimension)
BLOCK_K = 64     # selected rows a tile (the output wgmma's K: a multiple of 64 with the 128-byte swizzle)
LATENT, ROPE = 512, 64  # the only row layout the kernel takes (its shared memory is planned for it)
HALF = LATENT // 2      # output columns a consumer; also where a tile's left half ends
PIECE = 16       # bytes a cp.async copies
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class SparseMlaMgpuConfig:
  """Tuning of the Mosaic GPU sparse MLA kernel."""

  k_splits: int | None = None   # CTAs per (query, head block) along the top-k; None: enough CTAs for two
                                # waves over the GPU (one CTA fits an SM: 224 KiB of shared memory)
  l2_prefetch: int = 0          # 0, 64, 128 or 256: the L2 fetches that many bytes around each copied piece
  registers: tuple[int, int] = (232, 40)  # registers a thread of each consumer, of the producer (setmaxnreg)

  def __post_init__(self):
    if self.l2_prefetch not in (0, 64, 128, 256):
      raise ValueError(f"SparseMlaMgpuConfig.l2_prefetch = {self.l2_prefetch}: expected 0, 64, 128 or 256")
    consumer, producer = self.registers
    if any(n % 8 or not 24 <= n <= 256 for n in self.registers) or 2 * consumer + producer > 3 * 168:
      # The CTA's pool is what its 384 threads get at launch, 168 each (65536 / 384, in steps of 8): a
      # warpgroup asking for more than the others gave back would wait for ever.
      raise ValueError(f"SparseMlaMgpuConfig.registers = {self.registers}: expected multiples of 8 in [24, 256] "
                       "with 2 x consumer + producer <= 504")


def supports(c: int, r: int) -> bool:
  """Whether the kernel takes a latent of c and a rope part of r values."""
  return (c, r) == (LATENT, ROPE)


def _tiled(shape):
  return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _gather_half(kv, k_pe, idx, slot_raw, idx_and_ready, query, tile, row0, slot: int, right: bool,
                 l2_prefetch: int):
  """The producer's 128 threads copy one half of tile ``tile`` of query ``query``'s selection -- rows
  row0 + max(idx[query, 64 tile + i], 0) of [kv | k_pe] ([N, 512] and [N, 64] bf16, read in place: a
  concatenated copy of a whole cache would cost more than the attention), columns [0, 256) (left) or
  [256, 576) (right) -- into slot_raw (the raw bytes of a [64, 576] ref tiled (8, 64) and swizzled by 128
  bytes: row i's 16-byte piece p goes to ((i // 8) * 9 + p // 8) * 1024 + (i % 8) * 128 + ((p % 8) ^ (i % 8)) * 16).
  Thread t copies pieces t % 8 + 8 n of rows t // 8 + 16 m: eight neighbours copy 128 contiguous bytes of
  a row. With the slot's first half (slot 0's left, slot 1's right) threads 0-15 also copy the tile's 64
  indices into idx_and_ready[slot] (the consumers mask the -1 slots, which read row row0, from them).
  Each thread then has its copies arrive on the half's ``ready`` mbarrier (in idx_and_ready) as they land
  (``cp.async.mbarrier.arrive.noinc``): the producer never waits for its own copies."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm
  from jax.experimental.mosaic.gpu import utils as mu
  width = LATENT + ROPE
  col_tiles = width // 64
  tiles = range(HALF // 64, col_tiles) if right else range(HALF // 64)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 5 + (plgpu.Layout.WG_SPLAT,) * 3)
  def gather(ctx, kv, k_pe, idx, dst, idx_and_ready, query, tile, row0):
    del ctx
    query, tile, row0 = (a.registers.item() for a in (query, tile, row0))
    i32, i64, i8 = (ir.IntegerType.get_signless(n) for n in (32, 64, 8))
    bf16, index = ir.BF16Type.get(), ir.IndexType.get()
    c32 = lambda v: arith.constant(i32, v)
    tid = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), c32(128))
    lane, group = arith.remui(tid, c32(8)), arith.divui(tid, c32(8))
    global_ptr = lambda ref: llvm.addrspacecast(llvm.PointerType.get(address_space=1), mu.memref_ptr(ref))  # noqa: E731
    kv_ptr, pe_ptr = global_ptr(kv), global_ptr(k_pe)
    slot_ptr = mu.memref_ptr(dst)
    tile_start = arith.muli(tile, c32(BLOCK_K))
    swizzled = arith.muli(arith.xori(lane, arith.remui(group, c32(8))), c32(PIECE))  # (p % 8) ^ (i % 8), i % 8 = group % 8
    in_group = arith.addi(arith.muli(arith.remui(group, c32(8)), c32(128)), swizzled)
    for m in range(BLOCK_K // 16):
      row = arith.addi(group, c32(16 * m))
      sel = memref.load(idx, [arith.index_cast(index, query), arith.index_cast(index, arith.addi(tile_start, row))])
      src_row = arith.extui(i64, arith.addi(row0, arith.maxsi(sel, c32(0))))
      in_row = arith.extui(i64, arith.muli(lane, c32(PIECE // 2)))
      row_tiles = arith.muli(arith.divui(row, c32(8)), c32(col_tiles))
      for n in tiles:  # column tile n: latent columns 64 n.. from kv, the rope part from k_pe
        ptr, cols, col0 = (kv_ptr, LATENT, n * 64) if n < LATENT // 64 else (pe_ptr, ROPE, n * 64 - LATENT)
        src = arith.addi(arith.addi(arith.muli(src_row, arith.constant(i64, cols)), in_row), arith.constant(i64, col0))
        dst_off = arith.addi(arith.muli(arith.addi(row_tiles, c32(n)), c32(1024)), in_group)
        dst_ptr, src_ptr = mu.getelementptr(slot_ptr, [dst_off], i8), mu.getelementptr(ptr, [src], bf16)
        if l2_prefetch:
          mu.inline_ptx(f"cp.async.cg.shared.global.L2::{l2_prefetch}B [$0], [$1], {PIECE};", dst_ptr, src_ptr)
        else:
          nvvm.cp_async_shared_global(dst_ptr, src_ptr, PIECE, nvvm.LoadCacheModifierKind.CG)
    if (slot == 0) != right:  # the slot's first half: its indices too (16 threads x 4)
      with mu.when(arith.cmpi(arith.CmpIPredicate.ult, tid, c32(BLOCK_K // 4))):
        idx_src = mu.getelementptr(global_ptr(idx), [arith.extui(i64, arith.addi(
            arith.muli(query, c32(idx.type.shape[1])), arith.addi(tile_start, arith.muli(tid, c32(4)))))], i32)
        idx_dst_ptr = mu.getelementptr(mu.memref_ptr(idx_and_ready), [arith.addi(c32(slot * BLOCK_K), arith.muli(tid, c32(4)))], i32)
        nvvm.cp_async_shared_global(idx_dst_ptr, idx_src, PIECE, nvvm.LoadCacheModifierKind.CG)
    nvvm.cp_async_mbarrier_arrive(_mbarrier(idx_and_ready, 2 * slot + right), noinc=True)

  gather(kv, k_pe, idx, slot_raw, idx_and_ready, query, tile, row0)


def _mbarrier(idx_and_ready, k: int):
  """The address of ready mbarrier k: in row 2 of the [3, 64] int32 buffer whose rows 0-1 hold the two
  slots' indices (shared memory is allotted in 1 KiB units, and a kernel gets 227 KiB)."""
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import utils as mu
  return mu.getelementptr(mu.memref_ptr(idx_and_ready), [BLOCK_K // 2 + k], ir.IntegerType.get_signless(64))


def _init_ready(idx_and_ready):
  """Thread 0 initialises the four ``ready`` mbarriers (128 arrivals: one per producer thread's copies);
  then the whole CTA synchronises. Called by every warpgroup before they part."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import gpu, nvvm
  from jax.experimental.mosaic.gpu import utils as mu

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def init(ctx, raw):
    del ctx
    first = mu.single_thread_predicate(scope=mu.ThreadSubset.BLOCK)
    for k in range(4):
      nvvm.mbarrier_init(_mbarrier(raw, k), mu.c(128, ir.IntegerType.get_signless(32)), predicate=first)
    mu.inline_ptx("fence.mbarrier_init.release.cluster;", has_side_effects=True)
    gpu.barrier()

  init(idx_and_ready)


def _wait_ready(idx_and_ready, k: int, parity):
  """Waits for phase ``parity`` of ``ready`` mbarrier k (the pair's tiles complete each barrier once), then
  orders the landed bytes before this warpgroup's wgmma reads (they come through the async proxy)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, nvvm
  from jax.experimental.mosaic.gpu import utils as mu

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT))
  def wait(ctx, raw, parity):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    nvvm.mbarrier_try_wait_parity(_mbarrier(raw, k), parity.registers.item(), arith.constant(i32, 10000000))
    nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

  wait(idx_and_ready, parity)


# Hardware named barriers for the consumers' four handshakes a pair (``bar.arrive`` by the 128 threads that
# hand over, ``bar.sync`` by the 128 that take): one instruction each way, where an mbarrier's arrive and
# parity wait cost a round trip through shared memory. Mosaic GPU takes ids 0 (the CTA) and 1..3 (its
# warpgroups: ``mosaic.gpu.utils.warpgroup_barrier_idx`` in jax 0.11.2 -- recheck after an upgrade); these
# come after. Each is used once a pair, and neither side can start the next pair's use before the other
# has passed this pair's (every handshake is answered within the pair).
M0_READY, M1_READY, P0_READY, P1_READY = 8, 9, 10, 11
CONSUMER_THREADS = 256


def _named_barrier(bar_id: int, sync: bool):
  """``bar.sync`` (wait for the other consumer) or ``bar.arrive`` (hand over) on named barrier bar_id; the
  shared-memory writes before an arrive are visible to the syncing side after its sync."""
  from jax.experimental.mosaic.gpu import utils as mu

  @plgpu.inline_mgpu()
  def barrier(ctx):
    del ctx
    mu.inline_ptx(f"bar.{'sync' if sync else 'arrive'} {bar_id}, {CONSUMER_THREADS};", has_side_effects=True)

  barrier()


def sparse_mla_mgpu(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
                    k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float,
                    config: SparseMlaMgpuConfig = SparseMlaMgpuConfig()
                    ) -> tuple[Float[Array, "b s h c"], Float[Array, "b s h"]]:
  """Sparse MLA output [B, S, H, c] in bf16 and the log-sum-exp [B, S, H] in float32 (a query with no
  valid slot gets zeros and -inf). bf16 operands; latent 512, rope 64."""
  b, s, h, c = q_lat.shape
  r, t, k = q_pe.shape[-1], kv.shape[1], idx.shape[-1]
  width = c + r
  if kv.shape != (b, t, c) or k_pe.shape != (b, t, r) or q_pe.shape != (b, s, h, r) or idx.shape[:2] != (b, s):
    raise ValueError(f"sparse_mla_mgpu: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, kv {kv.shape}, "
                     f"k_pe {k_pe.shape}, idx {idx.shape} do not agree")
  if not supports(c, r):
    raise ValueError(f"sparse_mla_mgpu: takes a latent of {LATENT} and a rope part of {ROPE}, got {c} and {r}")
  if any(a.dtype != jnp.bfloat16 for a in (q_lat, q_pe, kv, k_pe)):
    raise TypeError("sparse_mla_mgpu takes bf16 operands")
  pair = 2 * BLOCK_K
  h_pad, k_pad = -(-h // HEADS) * HEADS, -(-k // pair) * pair
  n_q, n_hb, tiles = b * s, -(-h // HEADS), k_pad // BLOCK_K
  pad_heads = lambda a: jnp.pad(a.reshape(n_q, h, -1), ((0, 0), (0, h_pad - h), (0, 0)))  # noqa: E731
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, k_pad - k)), constant_values=-1)
  idx = jnp.where((idx >= 0) & (idx < t), idx, -1).astype(jnp.int32).reshape(n_q, k_pad)
  live_tiles = count_live_tiles(idx, BLOCK_K)  # [n_q]
  pairs = tiles // 2
  splits = config.k_splits or -(-2 * NUM_SMS // (n_q * n_hb))
  splits = max(1, min(splits, pairs))
  pairs_per_split = -(-pairs // splits)
  c_scale = scale * LOG2E  # scores in log2 units: exp2 below

  def kernel(q_lat_gmem, q_pe_gmem, kv_gmem, k_pe_gmem, idx_gmem, live_gmem, out_gmem, lse_gmem, q_and_out, slot0,
             slot1, p1_smem, rows_of_64, idx_smem, q_barrier, free_one, free_two, done):
    # Small per-row values: the running maxima the consumers trade and their sums; the tiles' indices.
    def m_row(wg): return rows_of_64.at[wg]
    def l_row(wg): return rows_of_64.at[2 + wg]
    (q_lat_smem, q_pe_smem), o_smem = q_and_out  # the output reuses the queries' bytes once both are done
    (raw0, tile0), (raw1, tile1) = slot0, slot1  # even tiles in slot 0, odd tiles in slot 1
    slot_raw, slot_tiled = (raw0, raw1), (tile0, tile1)
    hq, split = lax.axis_index("hq"), lax.axis_index("split")
    hb, qi = lax.rem(hq, n_hb), lax.div(hq, n_hb)  # a query's head blocks side by side: the second reads L2
    wg = lax.axis_index("wg")
    first_tile = split * (2 * pairs_per_split)
    n_pairs = jnp.clip(-(-(live_gmem[qi] - first_tile) // 2), 0, pairs_per_split)
    # Barriers of a tile half k = 2 slot + right: ready[k] (a raw mbarrier the producer's copies complete
    # as they land; phase = pair parity); released by the consumers that read it: slot 0 left (consumer 0)
    # and slot 1 right (consumer 1) in free_one[slot], slot 0 right and slot 1 left (both) in free_two[slot].
    _init_ready(idx_smem)
    left, right = pl.ds(0, HALF), pl.ds(HALF, HALF)
    p0_smem = tile0.at[:, pl.ds(c, BLOCK_K)]  # P_0 lives in slot 0's rope columns
    zero_scores = plgpu.layout_cast(jnp.zeros((HEADS, BLOCK_K), jnp.float32), plgpu.Layout.WGMMA)

    def issue_scores(s_ref, slot, is_right, i):
      """Issues the wgmma of one half of pair i's tile ``slot``'s scores into s_ref, once the half is in."""
      keys = slot_tiled[slot]
      _wait_ready(idx_smem, 2 * slot + is_right, lax.rem(i, 2))
      if is_right:
        plgpu.wgmma(s_ref, q_lat_smem.at[:, right], keys.at[:, right].T)
        plgpu.wgmma(s_ref, q_pe_smem, keys.at[:, pl.ds(c, r)].T)
      else:
        plgpu.wgmma(s_ref, q_lat_smem.at[:, left], keys.at[:, left].T)

    def scores(slot, right_first: bool, i):
      def run(s_ref):
        for is_right in (right_first, not right_first):
          issue_scores(s_ref, slot, is_right, i)
        return s_ref[...]
      return pl.run_scoped(run, plgpu.ACC((HEADS, BLOCK_K), jnp.float32))

    def masked(sc, slot):
      """Scores in log2 units, -inf at the tile's -1 slots."""
      valid = idx_smem.at[slot][...] >= 0
      return jnp.where(lax.broadcast_in_dim(valid, sc.shape, [1]), sc * c_scale, -jnp.inf)

    def wgmma_into(acc, a, b_ref):
      def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
      return pl.run_state(run)(plgpu.ACC.init(acc))

    def softmax(sc, m_old, m_new, acc, l):
      """P = exp2(S - m_new), the accumulator and sum rescaled from m_old to m_new."""
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no valid slot yet: nothing to rescale
      alpha = jnp.exp2(m_old - m_safe)
      p = jnp.exp2(sc - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
      return p, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), l * alpha + p.sum(axis=1)

    def rescale(p, acc, l, m_old, m_new):
      beta = jnp.exp2(m_old - jnp.where(m_new == -jnp.inf, 0.0, m_new))
      return (p * lax.broadcast_in_dim(beta, p.shape, [0]), acc * lax.broadcast_in_dim(beta, acc.shape, [0]),
              l * beta)

    def consumer0(i, carry, last: bool):
      """Pair i for consumer 0, whose scores S_0 came with the carry. Unless ``last``, the next pair's S_0
      is computed while the tensor cores finish this pair's P_1 . V_1 (FlashMLA's overlap)."""
      acc, m, l, sc = carry
      sc = masked(sc, 0)
      m0 = jnp.maximum(m, sc.max(axis=1))
      m_row(0)[...] = m0
      _named_barrier(M0_READY, sync=False)
      p, acc, l = softmax(sc, m, m0, acc, l)
      acc = wgmma_into(acc, p.astype(jnp.bfloat16), tile0.at[:, left])  # P_0 . V_0[:, :256]
      plgpu.barrier_arrive(free_one.at[0])
      _named_barrier(M1_READY, sync=True)
      m1 = plgpu.load(m_row(1), layout=plgpu.Layout.WGMMA.reduce(1))
      p, acc, l = rescale(p, acc, l, m0, m1)
      p0_smem[...] = p.astype(jnp.bfloat16)
      plgpu.commit_smem()
      _named_barrier(P0_READY, sync=False)
      plgpu.barrier_arrive(free_two.at[0])
      _wait_ready(idx_smem, 2, lax.rem(i, 2))
      _named_barrier(P1_READY, sync=True)
      if last:
        acc = wgmma_into(acc, p1_smem, tile1.at[:, left])  # P_1 . V_1[:, :256]
        plgpu.barrier_arrive(free_two.at[1])
        return acc, m1, l, sc

      def pv_and_next_scores(refs):
        acc_ref, s_ref = refs
        plgpu.wgmma(acc_ref, p1_smem, tile1.at[:, left])  # P_1 . V_1[:, :256]
        issue_scores(s_ref, 0, False, i + 1)              # the next pair's S_0, left half
        plgpu.wgmma_wait(1)                               # P_1 . V_1 done
        plgpu.barrier_arrive(free_two.at[1])
        issue_scores(s_ref, 0, True, i + 1)
      acc, sc = pl.run_state(pv_and_next_scores)((plgpu.ACC.init(acc), plgpu.ACC.init(zero_scores)))
      return acc, m1, l, sc

    def consumer1(i, carry):
      """Pair i for consumer 1: its scores S_1, then both its P . V products in flight together."""
      acc, m, l = carry
      sc = masked(scores(1, True, i), 1)  # the producer sends slot 1's right half first
      plgpu.barrier_arrive(free_two.at[1])  # consumer 1's only read of slot 1's left half
      _named_barrier(M0_READY, sync=True)
      m0 = plgpu.load(m_row(0), layout=plgpu.Layout.WGMMA.reduce(1))
      m1 = jnp.maximum(m0, sc.max(axis=1))
      m_row(1)[...] = m1
      _named_barrier(M1_READY, sync=False)
      p, acc, l = softmax(sc, m, m1, acc, l)
      p16 = p.astype(jnp.bfloat16)

      def pvs(acc_ref):
        plgpu.wgmma(acc_ref, p16, tile1.at[:, right])  # P_1 . V_1[:, 256:]
        p1_smem[...] = p16                             # while it runs: P_1 for consumer 0
        plgpu.commit_smem()
        _named_barrier(P1_READY, sync=False)
        _wait_ready(idx_smem, 1, lax.rem(i, 2))
        _named_barrier(P0_READY, sync=True)
        plgpu.wgmma(acc_ref, p0_smem, tile0.at[:, right])  # P_0 . V_0[:, 256:]
        plgpu.wgmma_wait(1)
        plgpu.barrier_arrive(free_one.at[1])
      acc = pl.run_state(pvs)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(free_two.at[0])
      return acc, m1, l

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(config.registers[0], action="increase")

      @pl.when(wg == 0)
      def _():
        heads = pl.ds(hb * HEADS, HEADS)
        plgpu.copy_gmem_to_smem(q_lat_gmem.at[qi, heads], q_lat_smem, q_barrier)
        plgpu.copy_gmem_to_smem(q_pe_gmem.at[qi, heads], q_pe_smem, q_barrier)
      plgpu.barrier_wait(q_barrier)
      init = (plgpu.layout_cast(jnp.zeros((HEADS, HALF), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((HEADS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
              plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))

      def run_consumer0():
        first = lax.cond(n_pairs > 0, lambda: scores(0, False, 0), lambda: zero_scores)
        carry = lax.fori_loop(0, n_pairs - 1, lambda i, cr: consumer0(i, cr, last=False), (*init, first))
        return lax.cond(n_pairs > 0, lambda: consumer0(n_pairs - 1, carry, last=True)[:3], lambda: carry[:3])

      acc, m, l = lax.cond(wg == 0, run_consumer0, lambda: lax.fori_loop(0, n_pairs, consumer1, init))
      l_row(wg)[...] = l
      plgpu.barrier_arrive(done)  # both consumers are past their last read of the queries
      plgpu.barrier_wait(done)
      l = l + plgpu.load(l_row(1 - wg), layout=plgpu.Layout.WGMMA.reduce(1))
      seen = l > 0
      norm = jnp.where(seen, l, 1.0)
      o_smem.at[wg][...] = (acc / lax.broadcast_in_dim(norm, acc.shape, [0])).astype(jnp.bfloat16)

      @pl.when(wg == 0)
      def _():  # the log-sum-exp, natural log; the maxima's row is free now
        m_row(0)[...] = jnp.where(seen, (m + jnp.log2(norm)) / LOG2E, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[split, qi, pl.ds(hb * HEADS, HEADS), pl.ds(wg * HALF, HALF)])

      @pl.when(wg == 0)
      def _():
        plgpu.copy_smem_to_gmem(m_row(0), lse_gmem.at[split, qi, pl.ds(hb * HEADS, HEADS)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(config.registers[1], action="decrease")
      row0 = (qi // s) * t  # the query's sequence's first row in rows_all

      # The halves in the order the consumers need them: (slot, right half?, the barrier that frees it).
      # Each is issued as soon as it is free; its copies complete its ready barrier themselves.
      order = ((0, False, free_one.at[0]), (1, True, free_one.at[1]), (0, True, free_two.at[0]),
               (1, False, free_two.at[1]))

      @pl.loop(0, n_pairs)
      def _(i):
        for slot, is_right, free in order:
          @pl.when(i > 0)
          def _():
            plgpu.barrier_wait(free)
          _gather_half(kv_gmem, k_pe_gmem, idx_gmem, slot_raw[slot], idx_smem, qi,
                       first_tile + 2 * i + slot, row0, slot, is_right, l2_prefetch=config.l2_prefetch)

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.RefUnion((_tiled((HEADS, c)), _tiled((HEADS, r))), _tiled((2, HEADS, HALF))),
        *[plgpu.RefUnion(plgpu.SMEM((BLOCK_K * width,), jnp.bfloat16), _tiled((BLOCK_K, width)))] * 2,
        _tiled((HEADS, BLOCK_K)),                     # P_1
        plgpu.SMEM((4, HEADS), jnp.float32),          # maxima, sums
        plgpu.SMEM((3, BLOCK_K), jnp.int32),          # the slots' indices; the ready mbarriers
        plgpu.Barrier(num_arrivals=2),                # queries: the latent and the rope part
        plgpu.Barrier(num_barriers=2),                # free_one
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # free_two
        plgpu.Barrier(num_arrivals=2),                # done
        collective_axes="wg",
    )

  o, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((splits, n_q, h_pad, c), jnp.bfloat16),
                jax.ShapeDtypeStruct((splits, n_q, h_pad), jnp.float32)),
      grid=(n_q * n_hb, splits),
      grid_names=("hq", "split"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,  # row reductions: in-warp
                                           lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(pad_heads(q_lat), pad_heads(q_pe), kv.reshape(b * t, c), k_pe.reshape(b * t, r), idx, live_tiles.astype(jnp.int32))
  o = jnp.moveaxis(o, 0, 1).reshape(b, s, splits, h_pad, c)
  o, lse = merge_splits(o, jnp.moveaxis(lse, 0, 1).reshape(b, s, splits, h_pad), jnp.bfloat16)
  return o[..., :h, :], lse[..., :h]
