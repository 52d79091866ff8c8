"""Session 19: a timeline of the Mosaic GPU sparse MLA kernel's warpgroups (H100).

Builds an instrumented copy of ``pallas_kernels/sparse_mla_mgpu.py`` (text edits on its source: thread 0
of each warpgroup stores %clock at fixed points of every pair into an extra int32 output), runs a prefill
of 2048 queries x 2048 top-k at 128K context, and prints the mean cycles between consecutive points over
the steady pairs (pairs 2..13 of 16) of all CTAs, per warpgroup; plus the whole pair's cycles.
"""
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

SRC = pathlib.Path(__file__).resolve().parents[2] / "pallas_kernels" / "sparse_mla_mgpu.py"
EV = 8  # points a pair


def _stamp(trace, cta, slot, wg: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, scf

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT, plgpu.Layout.WG_SPLAT))
  def f(ctx, trace, cta, slot):
    del ctx
    cta, slot = (a.registers.item() for a in (cta, slot))
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    clk = llvm.inline_asm(i32, [], "mov.u32 $0, %clock;", "=r", has_side_effects=True)
    tid = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), arith.constant(i32, 128))
    op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.eq, tid, arith.constant(i32, 0)))
    with ir.InsertionPoint(op.then_block):
      memref.store(clk, trace, [arith.index_cast(index, cta), arith.constant(index, wg), arith.index_cast(index, slot)])
      scf.yield_([])
  f(trace, cta, slot)


EDITS = [
  ("out_gmem, lse_gmem, q_and_out", "out_gmem, lse_gmem, trace_gmem, q_and_out"),
  ("    wg = lax.axis_index(\"wg\")\n",
   "    wg = lax.axis_index(\"wg\")\n    cta = hq * splits + split\n"
   "    def stamp(w, i, k): _stamp(trace_gmem, cta, i * EV + k, w)\n"),
  ("      acc, m, l, sc = carry\n      sc = masked(sc, 0)\n",
   "      acc, m, l, sc = carry\n      stamp(0, i, 0)\n      sc = masked(sc, 0)\n"),
  ("      plgpu.barrier_arrive(m_ready.at[0])\n      p, acc, l = softmax(sc, m, m0, acc, l)\n",
   "      plgpu.barrier_arrive(m_ready.at[0])\n      stamp(0, i, 1)\n      p, acc, l = softmax(sc, m, m0, acc, l)\n"),
  ("      plgpu.barrier_arrive(free_one.at[0])\n      plgpu.barrier_wait(m_ready.at[1])\n",
   "      plgpu.barrier_arrive(free_one.at[0])\n      stamp(0, i, 2)\n      plgpu.barrier_wait(m_ready.at[1])\n      stamp(0, i, 3)\n"),
  ("      plgpu.barrier_arrive(free_two.at[0])\n      _wait_ready(idx_smem, 2, lax.rem(i, 2))\n      plgpu.barrier_wait(p_ready.at[1])\n",
   "      plgpu.barrier_arrive(free_two.at[0])\n      stamp(0, i, 4)\n      _wait_ready(idx_smem, 2, lax.rem(i, 2))\n"
   "      plgpu.barrier_wait(p_ready.at[1])\n      stamp(0, i, 5)\n"),
  ("        issue_scores(s_ref, 0, False, i + 1)              # the next pair's S_0, left half\n",
   "        issue_scores(s_ref, 0, False, i + 1)              # the next pair's S_0, left half\n        stamp(0, i, 6)\n"),
  ("        return acc, m1, l, sc\n", "        stamp(0, i, 7)\n        return acc, m1, l, sc\n"),
  ("      acc, sc = pl.run_state(pv_and_next_scores)((plgpu.ACC.init(acc), plgpu.ACC.init(zero_scores)))\n",
   "      acc, sc = pl.run_state(pv_and_next_scores)((plgpu.ACC.init(acc), plgpu.ACC.init(zero_scores)))\n      stamp(0, i, 7)\n"),
  ("      acc, m, l = carry\n      sc = masked(scores(1, True, i), 1)",
   "      acc, m, l = carry\n      stamp(1, i, 0)\n      sc = masked(scores(1, True, i), 1)"),
  ("      plgpu.barrier_arrive(free_two.at[1])  # consumer 1's only read of slot 1's left half\n      plgpu.barrier_wait(m_ready.at[0])\n",
   "      plgpu.barrier_arrive(free_two.at[1])  # consumer 1's only read of slot 1's left half\n      stamp(1, i, 1)\n"
   "      plgpu.barrier_wait(m_ready.at[0])\n      stamp(1, i, 2)\n"),
  ("      plgpu.barrier_arrive(m_ready.at[1])\n      p, acc, l = softmax(sc, m, m1, acc, l)\n",
   "      plgpu.barrier_arrive(m_ready.at[1])\n      stamp(1, i, 3)\n      p, acc, l = softmax(sc, m, m1, acc, l)\n"),
  ("        plgpu.barrier_arrive(p_ready.at[1])\n        _wait_ready(idx_smem, 1, lax.rem(i, 2))\n        plgpu.barrier_wait(p_ready.at[0])\n",
   "        plgpu.barrier_arrive(p_ready.at[1])\n        stamp(1, i, 4)\n        _wait_ready(idx_smem, 1, lax.rem(i, 2))\n"
   "        plgpu.barrier_wait(p_ready.at[0])\n        stamp(1, i, 5)\n"),
  ("        plgpu.barrier_arrive(free_one.at[1])\n      acc = pl.run_state(pvs)",
   "        plgpu.barrier_arrive(free_one.at[1])\n        stamp(1, i, 6)\n      acc = pl.run_state(pvs)"),
  ("      plgpu.barrier_arrive(free_two.at[0])\n      return acc, m1, l\n",
   "      plgpu.barrier_arrive(free_two.at[0])\n      stamp(1, i, 7)\n      return acc, m1, l\n"),
  ("        for slot, is_right, free in order:\n", "        for n, (slot, is_right, free) in enumerate(order):\n"),
  ("            plgpu.barrier_wait(free)\n", "            plgpu.barrier_wait(free)\n          stamp(2, i, 2 * n)\n"),
  ("                       first_tile + 2 * i + slot, row0, slot, is_right, l2_prefetch=config.l2_prefetch)\n",
   "                       first_tile + 2 * i + slot, row0, slot, is_right, l2_prefetch=config.l2_prefetch)\n"
   "          stamp(2, i, 2 * n + 1)\n"),
  ("                jax.ShapeDtypeStruct((splits, n_q, h_pad), jnp.float32)),",
   "                jax.ShapeDtypeStruct((splits, n_q, h_pad), jnp.float32),\n"
   "                jax.ShapeDtypeStruct((n_q * n_hb * splits, 3, 16 * EV), jnp.int32)),"),
  ("  o, lse = plgpu.kernel(", "  o, lse, trace = plgpu.kernel("),
  ("  return o[..., :h, :], lse[..., :h]", "  return o[..., :h, :], lse[..., :h], trace"),
]


def timed_module():
  src = SRC.read_text()
  for old, new in EDITS:
    if src.count(old) != 1:
      raise SystemExit(f"edit not unique/found ({src.count(old)}): {old!r}")
    src = src.replace(old, new)
  mod = types.ModuleType("sparse_mla_mgpu_timed")
  mod.__dict__.update(_stamp=_stamp, EV=EV)
  sys.modules[mod.__name__] = mod
  exec(compile(src, "sparse_mla_mgpu_timed.py", "exec"), mod.__dict__)
  return mod


NAMES = {
  0: ["S0 ready->m0 posted", "softmax+PV0", "wait m1", "rescale+store P0", "wait ready1L+P1", "PV1 issue+wait ready0L+S0L issue", "rest: PV1 wait, S0R (wait 0R), wait"],
  1: ["scores S1 (wait halves)", "wait m0", "max+post m1", "softmax, PV1R issue, store P1", "wait ready0R+P0", "PV0R issue + wait(1)", "wait(0)+free"],
  2: ["issue 0L", "wait free 1R", "issue 1R", "wait free 0R", "issue 0R", "wait free 1L", "issue 1L"],
}


def main():
  from benchmarks.timing import median_seconds
  mod = timed_module()
  t, s = 131072, 2048
  ks = jax.random.split(jax.random.key(0), 5)
  bf = jnp.bfloat16
  a = (jax.random.normal(ks[0], (1, s, 128, 512), bf), jax.random.normal(ks[1], (1, s, 128, 64), bf),
       jax.random.normal(ks[2], (1, t, 512), bf), jax.random.normal(ks[3], (1, t, 64), bf),
       jax.random.randint(ks[4], (1, s, 2048), 0, t, jnp.int32))
  fn = jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, 0.07, mod.SparseMlaMgpuConfig(k_splits=1)))
  sec = median_seconds(fn, *a, iters=5)
  print(f"instrumented kernel: {sec * 1e3:.3f} ms", flush=True)
  tr = np.asarray(fn(*a)[2]).astype(np.int64).reshape(-1, 3, 16, EV)
  steady = tr[:, :, 2:14, :]
  for w in range(3):
    d = np.diff(steady[:, w], axis=-1) % (1 << 32)
    pair = (np.diff(tr[:, w, 2:15, 0], axis=-1) % (1 << 32))
    print(f"wg{w}: pair {pair.mean():8.0f} cycles (median {np.median(pair):.0f})")
    for k, name in enumerate(NAMES[w]):
      print(f"   {k}->{k + 1} {name:45s} {d[..., k].mean():8.0f}  (median {np.median(d[..., k]):.0f})")
  # where consumer 1's points fall relative to consumer 0's pair start
  rel = (tr[:, 1, 2:14, :] - tr[:, 0, 2:14, :1]) % (1 << 32)
  rel = np.where(rel > (1 << 31), rel - (1 << 32), rel)
  print("wg1 points relative to wg0's pair start:", np.median(rel.reshape(-1, EV), axis=0).astype(int).tolist())
  rel2 = (tr[:, 2, 2:14, :] - tr[:, 0, 2:14, :1]) % (1 << 32)
  rel2 = np.where(rel2 > (1 << 31), rel2 - (1 << 32), rel2)
  print("producer points relative to wg0's pair start:", np.median(rel2.reshape(-1, EV), axis=0).astype(int).tolist())


if __name__ == "__main__":
  sys.exit(main())
