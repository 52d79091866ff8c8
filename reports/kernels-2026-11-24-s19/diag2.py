"""Session 19, call 2: the overlapped consumers (this session's kernel) against session 18's, side by side.

Checks both against the float32 reference (short selections, -1 slots, duplicates; whole and split), then
times prefill (2048 queries at 4K / 32K / 128K) and decode (128K cache, batch 1 / 32 / 128, device time
of chained calls) for each.
"""
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import chained_seconds, median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels import sparse_mla_mgpu as new
from pallas_kernels.sparse_mla_gpu import flops

spec = importlib.util.spec_from_file_location("s18", pathlib.Path(__file__).with_name("sparse_mla_mgpu_s18.py"))
old = sys.modules["s18"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)


def inputs(key, b, s, t, k=2048, h=128, short=False):
  ks = jax.random.split(key, 5)
  bf = jnp.bfloat16
  idx = jax.random.randint(ks[4], (b, s, k), 0, t, jnp.int32)
  if short:
    n = jnp.minimum(jnp.arange(s) * 300 + 1, k)
    idx = jnp.where(jnp.arange(k)[None, None, :] < n[None, :, None], idx, -1)
  return (jax.random.normal(ks[0], (b, s, h, 512), bf), jax.random.normal(ks[1], (b, s, h, 64), bf),
          jax.random.normal(ks[2], (b, t, 512), bf), jax.random.normal(ks[3], (b, t, 64), bf), idx)


def main():
  scale = 0.07
  kernels = [("s18", old), ("s19", new)]
  a = inputs(jax.random.key(1), 2, 9, 5000, short=True)
  ref = sparse_attention_scaled(scale, *(x.astype(jnp.float32) for x in a[:4]), a[4])
  for name, mod in kernels:
    for splits in (1, 3, None):
      got, lse = jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, scale, mod.SparseMlaMgpuConfig(k_splits=splits)))(*a)
      print(f"check {name} k_splits {splits}: {rel_err(got.astype(jnp.float32), ref):.2e}  "
            f"finite lse {bool(jnp.isfinite(lse).all())}", flush=True)
  for t in (4096, 131072):
    a = inputs(jax.random.key(t), 1, 2048, t)
    f = flops(1, 2048, 128, 512, 64, 2048)
    for name, mod in kernels:
      sec = median_seconds(jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, scale)[0]), *a, iters=10)
      print(f"prefill {t:7d} {name} {sec * 1e3:8.3f} ms {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a
  for b in (1, 32, 128):
    a = inputs(jax.random.key(b), b, 1, 131072)
    f = flops(b, 1, 128, 512, 64, 2048)
    for name, mod in kernels:
      dev = chained_seconds(lambda *x: mod.sparse_mla_mgpu(*x, scale)[0], *a, reps=10)
      print(f"decode b{b:<4d} {name} device {dev * 1e6:8.1f} us  rows {b * 2048 * 1152 / dev / 1e12:5.2f} TB/s  "
            f"{f / dev / 1e12:6.1f} TFLOP/s", flush=True)
    del a


if __name__ == "__main__":
  sys.exit(main())
