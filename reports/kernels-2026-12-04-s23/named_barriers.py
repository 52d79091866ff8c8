"""Session 23, call 3: the sparse MLA kernel with named barriers for the consumers' handshakes (this tree)
against the same kernel with mbarriers (main before the change, carried as .bench_old/), side by side on
one GPU: prefill 2048 queries x 128 heads x top-k 2048 at 4K / 128K, random and window rows; decode
batch 32 / 128 at 128K (device time); both checked against the float32 reference."""
import importlib.util
import sys

import jax
import jax.numpy as jnp

from benchmarks.sparse_mla_mgpu_check import inputs
from benchmarks.timing import chained_seconds, median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels import sparse_mla_mgpu as new
from pallas_kernels.sparse_mla_gpu import flops

spec = importlib.util.spec_from_file_location("sparse_mla_mgpu_head", ".bench_old/sparse_mla_mgpu_head.py")
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)
SCALE = 0.0721

for b, s, t, pattern in ((1, 2048, 4096, "random"), (1, 2048, 4096, "window"), (1, 2048, 131072, "random"),
                         (1, 2048, 131072, "window"), (32, 1, 131072, "random"), (128, 1, 131072, "random")):
  a = inputs(jax.random.key(t + b), b, s, 128, t, 2048, valid_first=True if s > 1 else None, pattern=pattern)
  f = flops(b, s, 128, 512, 64, 2048)
  if s > 1:
    ref = jax.jit(lambda *x: sparse_attention_scaled(SCALE, *(v.astype(jnp.float32) for v in x[:4]), x[4]))
    want = ref(*(v[:, :256] if v.ndim > 2 and v.shape[1] == s else v for v in a))
  for name, mod in (("mbarriers", old), ("named", new)):
    fn = jax.jit(lambda *x, mod=mod: mod.sparse_mla_mgpu(*x, SCALE)[0])
    if s > 1:
      got = fn(*(v[:, :256] if v.ndim > 2 and v.shape[1] == s else v for v in a))
      err = rel_err(got, want)
      sec = median_seconds(fn, *a, iters=10)
    else:
      err, sec = float("nan"), chained_seconds(fn, *a)
    print(f"{'prefill' if s > 1 else 'decode'} b{b:<3d} {t:7d} {pattern:7s} {name:9s} {sec * 1e3:8.3f} ms "
          f"{f / sec / 1e12:6.1f} TFLOP/s  err {err:.2e}", flush=True)
  del a
