"""The Mosaic GPU sparse MLA kernel against the float32 reference and the Triton kernel, side by side.

  PYTHONPATH=. python3 benchmarks/sparse_mla_mgpu_check.py [--contexts 4096 131072] [--queries 2048] [--decode-batch 32]

Random rows (duplicates allowed), 128 heads, latent 512 + rope 64, top-k 2048; the check uses short
selections for the first queries (-1 slots). Decode inputs give each sequence its own 128K cache, so
batches much above 32 do not fit an H100.
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels.sparse_mla_gpu import flops, sparse_mla_gpu
from pallas_kernels.sparse_mla_mgpu import SparseMlaMgpuConfig, sparse_mla_mgpu


def inputs(key, b, s, h, t, k, valid_first=None):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, s, h, 512), jnp.float32).astype(jnp.bfloat16)
  qp = jax.random.normal(ks[1], (b, s, h, 64), jnp.float32).astype(jnp.bfloat16)
  kv = jax.random.normal(ks[2], (b, t, 512), jnp.float32).astype(jnp.bfloat16)
  kp = jax.random.normal(ks[3], (b, t, 64), jnp.float32).astype(jnp.bfloat16)
  idx = jax.random.randint(ks[4], (b, s, k), 0, t, jnp.int32)  # duplicates allowed: both kernels take them
  if valid_first is not None:  # the first queries use fewer slots (-1 after)
    n = jnp.minimum(jnp.arange(s) * 7 + 1, k)
    idx = jnp.where(jnp.arange(k)[None, None, :] < n[None, :, None], idx, -1)
  return q, qp, kv, kp, idx


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 131072])
  ap.add_argument("--queries", type=int, default=2048)
  ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32])
  ap.add_argument("--l2-prefetch", type=int, nargs="*", default=[0], help="SparseMlaMgpuConfig.l2_prefetch values")
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
  cases = [(f"prefill, {args.queries} queries at context {t:,}", 1, args.queries, t) for t in args.contexts]
  cases += [(f"decode, batch {b}, cache 131,072", b, 1, 131072) for b in args.decode_batch]
  for what, b, s, t in cases:
    a = inputs(jax.random.key(t + b), b, s, 128, t, 2048)
    f = flops(b, s, 128, 512, 64, 2048)
    kernels = [("triton", lambda *x: sparse_mla_gpu(*x, scale)[0])]
    kernels += [(f"mgpu l2 {p}", lambda *x, p=p: sparse_mla_mgpu(*x, scale, SparseMlaMgpuConfig(l2_prefetch=p))[0])
                for p in args.l2_prefetch]
    for name, fn in kernels:
      sec = median_seconds(jax.jit(fn), *a, iters=5)
      print(f"{what:45s} {name:12s} {sec * 1e3:8.3f} ms  {f / sec / 1e12:6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
