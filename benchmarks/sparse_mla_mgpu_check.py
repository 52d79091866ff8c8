"""The Mosaic GPU sparse MLA kernel against the float32 reference and the Triton kernel, side by side.

  PYTHONPATH=. python3 benchmarks/sparse_mla_mgpu_check.py [--contexts 4096 32768 131072] [--queries 2048]
      [--decode-batch 1 32 128] [--patterns random sorted window]

128 heads, latent 512 + rope 64, top-k 2048; the check uses short selections for the first queries (-1
slots). Prefill selections: ``random`` -- rows drawn at random (duplicates allowed), the pessimistic case;
``sorted`` -- the same rows in ascending order, as the GPU top-k kernel emits them;
``window`` -- query q selects rows q .. q + 2047 (mod the context): neighbouring queries share almost all
rows, as DSA's selections of neighbouring queries largely do. Prefill is timed by wall clock (milliseconds
a call); decode, whose calls are tens of microseconds, by device time (``timing.chained_seconds``), as a
share of the measured HBM bandwidth over the bytes it must read (the selected rows, the queries) and write.
Each decode sequence has its own 128K bf16 cache (batch 128: 19 GB).
"""
import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import chained_seconds, measured_hbm_bandwidth, median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels.sparse_mla_gpu import flops, sparse_mla_gpu
from pallas_kernels.sparse_mla_mgpu import SparseMlaMgpuConfig, sparse_mla_mgpu


def inputs(key, b, s, h, t, k, valid_first=None, pattern="random"):
  ks = jax.random.split(key, 5)
  bf = jnp.bfloat16
  q, qp = jax.random.normal(ks[0], (b, s, h, 512), bf), jax.random.normal(ks[1], (b, s, h, 64), bf)
  kv, kp = jax.random.normal(ks[2], (b, t, 512), bf), jax.random.normal(ks[3], (b, t, 64), bf)
  if pattern == "window":
    idx = jnp.broadcast_to((jnp.arange(s)[:, None] + jnp.arange(k)[None, :]) % t, (b, s, k)).astype(jnp.int32)
  else:
    idx = jax.random.randint(ks[4], (b, s, k), 0, t, jnp.int32)  # duplicates allowed: both kernels take them
    if pattern == "sorted":
      idx = jnp.sort(idx, axis=-1)
  if valid_first is not None:  # the first queries use fewer slots (-1 after)
    n = jnp.minimum(jnp.arange(s) * 7 + 1, k)
    idx = jnp.where(jnp.arange(k)[None, None, :] < n[None, :, None], idx, -1)
  return q, qp, kv, kp, idx


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072])
  ap.add_argument("--queries", type=int, default=2048)
  ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32, 128])
  ap.add_argument("--patterns", nargs="*", default=["random", "sorted", "window"], choices=["random", "sorted", "window"],
                  help="prefill selections")
  args = ap.parse_args(argv)
  scale = 0.07
  q, qp, kv, kp, idx = inputs(jax.random.key(0), 2, 5, 128, 5000, 2048, valid_first=True)
  ref = sparse_attention_scaled(scale, *(a.astype(jnp.float32) for a in (q, qp, kv, kp)), idx)
  tri = jax.jit(lambda *a: sparse_mla_gpu(*a, scale)[0])(q, qp, kv, kp, idx)
  print(f"check vs float32 reference: triton {rel_err(tri.astype(jnp.float32), ref):.2e}", flush=True)
  tri_lse = jax.jit(lambda *a: sparse_mla_gpu(*a, scale)[1])(q, qp, kv, kp, idx)
  for splits in (1, 3, None):
    got, lse = jax.jit(lambda *a: sparse_mla_mgpu(*a, scale, SparseMlaMgpuConfig(k_splits=splits)))(q, qp, kv, kp, idx)
    print(f"check vs float32 reference: mgpu (k_splits {splits}) {rel_err(got.astype(jnp.float32), ref):.2e}, "
          f"lse vs triton's {rel_err(lse, tri_lse):.2e}", flush=True)
  none = idx.at[0, 1].set(-1)  # a query without a valid slot: zeros, lse -inf
  got, lse = jax.jit(lambda *a: sparse_mla_mgpu(*a, scale))(q, qp, kv, kp, none)
  print(f"query without valid slots: max |o| {float(jnp.abs(got[0, 1]).max())}, lse {float(lse[0, 1].max())}", flush=True)
  kernels = [("triton", lambda *x: sparse_mla_gpu(*x, scale)[0]), ("mgpu", lambda *x: sparse_mla_mgpu(*x, scale)[0])]
  for t in args.contexts:
    for pattern in args.patterns:
      a = inputs(jax.random.key(t), 1, args.queries, 128, t, 2048, pattern=pattern)
      f = flops(1, args.queries, 128, 512, 64, 2048)
      for name, fn in kernels:
        sec = median_seconds(jax.jit(fn), *a, iters=10)
        print(f"prefill, {args.queries} queries at context {t:>7,} ({pattern:6s}) {name:6s} {sec * 1e3:8.3f} ms  "
              f"{f / sec / 1e12:6.1f} TFLOP/s", flush=True)
      del a
  hbm = measured_hbm_bandwidth()
  print(f"HBM (device copy): {hbm / 1e12:.2f} TB/s", flush=True)
  for b in args.decode_batch:
    a = inputs(jax.random.key(b), b, 1, 128, 131072, 2048)
    f = flops(b, 1, 128, 512, 64, 2048)
    moved = b * 2048 * 576 * 2 + b * 128 * (576 + 512) * 2  # selected rows, queries in, output out (bf16)
    for name, fn in kernels:
      sec = chained_seconds(fn, *a, reps=10)
      print(f"decode, batch {b:3d}, cache 131,072: {name:6s} device {sec * 1e6:8.1f} us  {moved / sec / 1e12:5.2f} TB/s "
            f"({moved / sec / hbm:5.1%} of HBM)  {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a

if __name__ == "__main__":
  sys.exit(main())
