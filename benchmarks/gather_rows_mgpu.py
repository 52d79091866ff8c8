"""Gathering scattered cache rows into the tiles a Mosaic GPU wgmma reads, on Hopper: two ways, checked and timed.

Hopper's TMA has no gather, and a Pallas smem ref tiled (8, 64) for wgmma rejects one-row slices, so
Pallas Mosaic GPU cannot gather MLA's selected rows by itself (why ``pallas_kernels/sparse_mla_gpu.py``
is Pallas Triton). The ways around, both into the 128-byte-swizzled (8, 64) tiling:

- per-row TMA: one TMA per selected row and 64-column chunk into a view tiled (1, 64) -- row r lands at
  byte r * 128 of its chunk, where the (8, 64) view expects it, and the TMA unit swizzles by address --
  aliased with the (8, 64) view through a ``plgpu.RefUnion`` (``gather_scores``, ``gather_only``);
- ``cp.async`` from every thread of a warpgroup (FlashMLA's way), written through ``plgpu.inline_mgpu``
  to each 16-byte piece's swizzled place in a raw view aliased with the tiled one
  (``cp_async_scores``, ``cp_async_gather_only``).

  PYTHONPATH=. python3 benchmarks/gather_rows_mgpu.py            # on an H100: checks + gather rates
  PYTHONPATH=. python3 benchmarks/gather_rows_mgpu.py --lower    # CPU: Mosaic GPU lowering only

Checks: q @ kv[idx].T through each gather and a wgmma, against numpy. Rates: CTAs that only gather tiles
of 64 rows x 576 values (MLA's latent + rope), for bytes/s. Results: BENCHMARKS.md.
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS, CHUNK = 64, 64
SWIZZLE = plgpu.SwizzleTransform(128)


def row_view(cols):  # what each per-row TMA writes: tiles of one row
  return plgpu.SMEM((ROWS, cols), jnp.bfloat16, transforms=(plgpu.TilingTransform((1, CHUNK)), SWIZZLE))


def mma_view(cols):  # the same bytes as wgmma's B operand
  return plgpu.SMEM((ROWS, cols), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, CHUNK)), SWIZZLE))


def _scores_to_gmem(q_smem, rows_mma, out_smem, out_gmem):
  """q @ rows^T by one wgmma (the check that the gathered rows sit where wgmma reads them), out to GMEM."""
  def mma(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, rows_mma.T)
    out_smem[...] = plgpu.wgmma_accumulator_load(acc_ref)
  pl.run_scoped(mma, plgpu.ACC((ROWS, ROWS), jnp.float32))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem)
  plgpu.wait_smem_to_gmem(0)


def gather_scores(kv, idx, q):
  """s[i, j] = q[i] . kv[idx[j]]  (q [64, 64], kv [T, 64] bf16, idx [64])."""
  def kernel(idx_gmem, kv_gmem, q_gmem, out_gmem, rows, q_smem, out_smem, barrier):
    rows_tma, rows_mma = rows
    @pl.loop(0, ROWS)
    def _(j):
      plgpu.copy_gmem_to_smem(kv_gmem.at[pl.ds(idx_gmem[j], 1)], rows_tma.at[pl.ds(j, 1)], barrier)
    plgpu.copy_gmem_to_smem(q_gmem, q_smem, barrier)
    plgpu.barrier_wait(barrier)

    _scores_to_gmem(q_smem, rows_mma, out_smem, out_gmem)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((ROWS, ROWS), jnp.float32),
      scratch_types=[plgpu.RefUnion(row_view(CHUNK), mma_view(CHUNK)), mma_view(CHUNK),
                     plgpu.SMEM((ROWS, ROWS), jnp.float32), plgpu.Barrier(num_arrivals=ROWS + 1)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(idx, kv, q)


def gather_only(kv, idx):
  """Each CTA gathers idx.shape[1] tiles of 64 rows x all columns (one TMA per row and 64-column chunk)."""
  n_ctas, tiles, _ = idx.shape
  chunks = kv.shape[1] // CHUNK

  def kernel(idx_gmem, kv_gmem, out_gmem, *scratch):
    bufs, barrier = scratch[:chunks], scratch[chunks]
    cta = jax.lax.axis_index("c")

    @pl.loop(0, tiles)
    def _(tile):
      @pl.loop(0, ROWS)
      def _(j):
        r = idx_gmem[cta, tile, j]
        for c in range(chunks):
          plgpu.copy_gmem_to_smem(kv_gmem.at[pl.ds(r, 1), pl.ds(c * CHUNK, CHUNK)], bufs[c].at[pl.ds(j, 1)], barrier)
      plgpu.barrier_wait(barrier)
    plgpu.copy_smem_to_gmem(bufs[0], out_gmem.at[cta])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n_ctas, ROWS, CHUNK), jnp.bfloat16),
      scratch_types=[row_view(CHUNK) for _ in range(chunks)] + [plgpu.Barrier(num_arrivals=ROWS * chunks)],
      grid=(n_ctas,), grid_names=("c",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(idx, kv)


# --- cp.async from every thread of a warpgroup (what FlashMLA's producer does) ---------------------

LATENT = 576          # MLA's cached row: latent 512 + rope 64 (bf16)
CHUNKS16 = LATENT * 2 // 16  # 16-byte pieces a row


def _gather_rows_cp_async(kv_ref, idx_ref, dst_ref):
  """Every thread of the warpgroup copies 16-byte pieces of the selected rows (idx_ref[j], j < 64, in
  smem) into dst_ref, a [64, 576] bf16 smem ref tiled (8, 64) with the 128-byte swizzle: row r, piece
  p lands in column tile p // 8 at ((r // 8) * 9 + p // 8) * 1024 + (r % 8) * 128 + ((p % 8) ^ (r % 8)) * 16.
  Waits for its own copies; the caller fences and syncs before a wgmma reads them."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm
  from jax.experimental.mosaic.gpu import utils as mu

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
  def gather(ctx, kv, idx, dst):
    del ctx
    i32, i64, i8 = (ir.IntegerType.get_signless(n) for n in (32, 64, 8))
    bf16, index = ir.BF16Type.get(), ir.IndexType.get()
    c32 = lambda v: arith.constant(i32, v)
    tid = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), c32(128))
    kv_ptr = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mu.memref_ptr(kv))
    smem_ptr = mu.memref_ptr(dst)
    tiles_per_row = LATENT // 64
    for it in range(ROWS * CHUNKS16 // 128):
      lin = arith.addi(tid, c32(it * 128))
      row, piece = arith.divui(lin, c32(CHUNKS16)), arith.remui(lin, c32(CHUNKS16))
      r = memref.load(idx, [arith.index_cast(index, row)])
      g_off = arith.addi(arith.muli(arith.extui(i64, r), arith.constant(i64, LATENT)),
                         arith.extui(i64, arith.muli(piece, c32(8))))
      ri, rg = arith.remui(row, c32(8)), arith.divui(row, c32(8))
      ct, pc = arith.divui(piece, c32(8)), arith.remui(piece, c32(8))
      s_off = arith.addi(arith.addi(arith.muli(arith.addi(arith.muli(rg, c32(tiles_per_row)), ct), c32(1024)),
                                    arith.muli(ri, c32(128))),
                         arith.muli(arith.xori(pc, ri), c32(16)))
      nvvm.cp_async_shared_global(mu.getelementptr(smem_ptr, [s_off], i8), mu.getelementptr(kv_ptr, [g_off], bf16),
                                  16, nvvm.LoadCacheModifierKind.CG)
    nvvm.cp_async_commit_group()
    nvvm.cp_async_wait_group(0)

  gather(kv_ref, idx_ref, dst_ref)


def cp_async_scores(kv, idx, q):
  """s = q @ kv[idx].T with q [64, 576], kv [T, 576] bf16, idx [64]: rows gathered by cp.async."""
  view = lambda: mma_view(LATENT)

  def kernel(idx_gmem, kv_gmem, q_gmem, out_gmem, rows_union, q_smem, out_smem, idx_smem, barrier):
    rows_raw, rows = rows_union
    plgpu.copy_gmem_to_smem(q_gmem, q_smem, barrier)
    plgpu.copy_gmem_to_smem(idx_gmem, idx_smem, barrier)
    plgpu.barrier_wait(barrier)
    _gather_rows_cp_async(kv_gmem, idx_smem, rows_raw)
    plgpu.commit_smem()

    _scores_to_gmem(q_smem, rows, out_smem, out_gmem)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((ROWS, ROWS), jnp.float32),
      scratch_types=[plgpu.RefUnion(plgpu.SMEM((ROWS * LATENT,), jnp.bfloat16), view()), view(),
                     plgpu.SMEM((ROWS, ROWS), jnp.float32), plgpu.SMEM((ROWS,), jnp.int32),
                     plgpu.Barrier(num_arrivals=2)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(idx, kv, q)


def cp_async_gather_only(kv, idx):
  """Each CTA gathers idx.shape[1] tiles of 64 rows x 576 values with cp.async from its 128 threads."""
  n_ctas, tiles, _ = idx.shape
  flat = idx.reshape(-1)

  def kernel(idx_gmem, kv_gmem, out_gmem, buf_union, idx_smem, barrier):
    buf_raw, buf = buf_union
    cta = jax.lax.axis_index("c")

    @pl.loop(0, tiles)
    def _(tile):
      plgpu.copy_gmem_to_smem(idx_gmem.at[pl.ds((cta * tiles + tile) * ROWS, ROWS)], idx_smem, barrier)
      plgpu.barrier_wait(barrier)
      _gather_rows_cp_async(kv_gmem, idx_smem, buf_raw)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buf, out_gmem.at[cta])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n_ctas, ROWS, LATENT), jnp.bfloat16),
      scratch_types=[plgpu.RefUnion(plgpu.SMEM((ROWS * LATENT,), jnp.bfloat16), mma_view(LATENT)),
                     plgpu.SMEM((ROWS,), jnp.int32), plgpu.Barrier(num_arrivals=1)],
      grid=(n_ctas,), grid_names=("c",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(flat, kv)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lower", action="store_true")
  ap.add_argument("--rows", type=int, default=131072, help="cache rows to gather from")
  ap.add_argument("--ctas", type=int, default=528)
  ap.add_argument("--tiles", type=int, default=32)
  args = ap.parse_args(argv)
  t = 4096
  kv = jax.random.normal(jax.random.key(0), (t, CHUNK), jnp.float32).astype(jnp.bfloat16)
  q = jax.random.normal(jax.random.key(1), (ROWS, CHUNK), jnp.float32).astype(jnp.bfloat16)
  idx = jax.random.randint(jax.random.key(2), (ROWS,), 0, t, jnp.int32)
  cache = jax.random.normal(jax.random.key(3), (args.rows, 576), jnp.float32).astype(jnp.bfloat16)
  sel = jax.random.randint(jax.random.key(4), (args.ctas, args.tiles, ROWS), 0, args.rows, jnp.int32)
  if args.lower:
    kv576, q576 = jnp.zeros((t, LATENT), jnp.bfloat16), jnp.zeros((ROWS, LATENT), jnp.bfloat16)
    for f, a in ((gather_scores, (kv, idx, q)), (gather_only, (cache, sel)), (cp_async_scores, (kv576, idx, q576)),
                 (cp_async_gather_only, (cache, sel))):
      print(f.__name__, "lowers:", "mosaic_gpu" in jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text())
    return
  got = np.asarray(gather_scores(kv, idx, q))
  want = np.asarray(q, np.float32) @ np.asarray(kv, np.float32)[np.asarray(idx)].T
  print(f"check: gathered rows through the aliased views, rel err {np.linalg.norm(got - want) / np.linalg.norm(want):.2e}")
  out = np.asarray(gather_only(cache, sel))
  first = np.asarray(cache)[np.asarray(sel)[:, -1, :], :CHUNK]
  print(f"check: gather-only kernel's last tile, first chunk equal: {np.array_equal(out, first)}")
  kv576 = jax.random.normal(jax.random.key(5), (t, LATENT), jnp.float32).astype(jnp.bfloat16)
  q576 = jax.random.normal(jax.random.key(6), (ROWS, LATENT), jnp.float32).astype(jnp.bfloat16)
  got = np.asarray(cp_async_scores(kv576, idx, q576))
  want = np.asarray(q576, np.float32) @ np.asarray(kv576, np.float32)[np.asarray(idx)].T
  print(f"check: cp.async gather into the swizzled tiles, wgmma over 576, rel err "
        f"{np.linalg.norm(got - want) / np.linalg.norm(want):.2e}")
  out = np.asarray(cp_async_gather_only(cache, sel))
  print(f"check: cp.async gather-only kernel's last tile equal: "
        f"{np.array_equal(out, np.asarray(cache)[np.asarray(sel)[:, -1, :]])}")
  from benchmarks.timing import median_seconds
  nbytes = sel.size * 576 * 2
  for name, fn, unit in (("TMA a row chunk", gather_only, 9), ("cp.async, 128 threads", cp_async_gather_only, 72)):
    sec = median_seconds(jax.jit(fn), cache, sel, iters=10)
    print(f"gather only, {name}: {args.ctas} CTAs x {args.tiles} tiles x 64 rows x 1152 B = {nbytes / 1e9:.2f} GB "
          f"in {sec * 1e3:.3f} ms = {nbytes / sec / 1e12:.2f} TB/s ({sel.size * unit / sec / 1e9:.2f} G copies/s)")


if __name__ == "__main__":
  sys.exit(main())
