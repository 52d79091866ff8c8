"""Session 19, call 1: where the Mosaic GPU sparse MLA kernel's time goes (H100).

Prefill, 2048 queries, 128 heads, top-k 2048 at 4K and 128K context: random rows (as the benchmark), one
hot row for every slot (gathers served by L2), and no gathers at all (cp.async replaced by nothing while
tracing: the consumers' and the barriers' cost alone; output garbage). Decode at 128K, batch 1/32/128:
wall time per call (host included) and device time per call (calls chained in one program).
"""
import contextlib
import sys

import jax
import jax.numpy as jnp
from jax._src.lib.mlir.dialects import nvvm

from benchmarks.timing import chained_seconds, median_seconds
from pallas_kernels.sparse_mla_gpu import flops, sparse_mla_gpu
from pallas_kernels.sparse_mla_mgpu import sparse_mla_mgpu


def inputs(key, b, s, t, k=2048, h=128):
  ks = jax.random.split(key, 5)
  bf = jnp.bfloat16
  return (jax.random.normal(ks[0], (b, s, h, 512), bf), jax.random.normal(ks[1], (b, s, h, 64), bf),
          jax.random.normal(ks[2], (b, t, 512), bf), jax.random.normal(ks[3], (b, t, 64), bf),
          jax.random.randint(ks[4], (b, s, k), 0, t, jnp.int32))


@contextlib.contextmanager
def no_gathers():
  orig = nvvm.cp_async_shared_global
  nvvm.cp_async_shared_global = lambda *a, **k: None
  try:
    yield
  finally:
    nvvm.cp_async_shared_global = orig


def main():
  scale = 0.07
  mg = lambda *x: sparse_mla_mgpu(*x, scale)[0]  # noqa: E731
  tri = lambda *x: sparse_mla_gpu(*x, scale)[0]  # noqa: E731
  for t in (4096, 131072):
    a = inputs(jax.random.key(t), 1, 2048, t)
    f = flops(1, 2048, 128, 512, 64, 2048)
    hot = a[:4] + (jnp.full_like(a[4], 5),)
    rows = [("triton random", tri, a, None), ("mgpu random", mg, a, None), ("mgpu one hot row", mg, hot, None),
            ("mgpu no gathers", mg, a, no_gathers)]
    for name, fn, args, ctx in rows:
      with (ctx() if ctx else contextlib.nullcontext()):
        comp = jax.jit(fn).lower(*args).compile()
      sec = median_seconds(comp, *args, iters=10)
      print(f"prefill {t:7d} {name:18s} {sec * 1e3:8.3f} ms {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a, hot
  for b in (1, 32, 128):
    a = inputs(jax.random.key(b), b, 1, 131072)
    rows_bytes = b * 2048 * 576 * 2
    for name, fn in (("triton", tri), ("mgpu", mg)):
      wall = median_seconds(jax.jit(fn), *a, iters=10)
      dev = chained_seconds(fn, *a, reps=20)
      print(f"decode b{b:<4d} {name:7s} wall {wall * 1e6:8.1f} us  device {dev * 1e6:8.1f} us  "
            f"rows {rows_bytes / dev / 1e12:5.2f} TB/s", flush=True)
    del a


if __name__ == "__main__":
  sys.exit(main())
