"""Session 20, call 1: the register split between the consumers and the producer (setmaxnreg), and the
producer's L2 prefetch hint, side by side.

Checks each split against the float32 reference (short selections, -1 slots; whole and split top-k),
then times prefill (2048 queries x top-k 2048 at 4K and 128K).
"""
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels import sparse_mla_mgpu as mgpu
from pallas_kernels.sparse_mla_gpu import flops

SPLITS = [(232, 40), (224, 56), (216, 72)]
VARIANTS = [dict(registers=r) for r in SPLITS] + [dict(l2_prefetch=256)]


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
  a = inputs(jax.random.key(1), 2, 9, 5000, short=True)
  ref = sparse_attention_scaled(scale, *(x.astype(jnp.float32) for x in a[:4]), a[4])
  for regs in VARIANTS:
    for splits in (None,):
      cfg = mgpu.SparseMlaMgpuConfig(k_splits=splits, **regs)
      got, _ = jax.jit(lambda *x: mgpu.sparse_mla_mgpu(*x, scale, cfg))(*a)
      print(f"check {regs} k_splits {splits}: {rel_err(got.astype(jnp.float32), ref):.2e}", flush=True)
  f = flops(1, 2048, 128, 512, 64, 2048)
  for t in (4096, 131072):
    a = inputs(jax.random.key(t), 1, 2048, t)
    for regs in VARIANTS:
      cfg = mgpu.SparseMlaMgpuConfig(**regs)
      sec = median_seconds(jax.jit(lambda *x: mgpu.sparse_mla_mgpu(*x, scale, cfg)[0]), *a, iters=10)
      print(f"prefill {t:7d} {regs} {sec * 1e3:8.3f} ms {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a


if __name__ == "__main__":
  sys.exit(main())
