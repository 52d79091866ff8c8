"""Session 20, call 2: what bounds the Mosaic GPU sparse MLA prefill now (H100), side by side in one run.

- ``random``: top-k indices drawn at random from the context (the benchmark's case);
- ``window``: query q selects rows q .. q + 2047 (mod the context): contiguous 64-row tiles, and
  neighbouring queries share almost all rows (the friendliest gather);
- ``nocopy``: a copy of the kernel whose producer issues no row copies (only the indices; its ready
  barriers complete at once): what the consumers and the synchronisation alone take.
Each at 4K and 128K, 2048 queries x top-k 2048. Then (with MOSAIC_GPU_DUMP_PTXAS=1, in subprocesses)
ptxas's register and spill figures for four register splits.
"""
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp

from benchmarks.timing import median_seconds
from pallas_kernels import sparse_mla_mgpu as mgpu
from pallas_kernels.sparse_mla_gpu import flops

SRC = pathlib.Path(mgpu.__file__)
COPY = "          nvvm.cp_async_shared_global(dst_ptr, src_ptr, PIECE, nvvm.LoadCacheModifierKind.CG)\n"


def nocopy_module():
  src = SRC.read_text()
  assert src.count(COPY) == 1
  mod = types.ModuleType("sparse_mla_mgpu_nocopy")
  sys.modules[mod.__name__] = mod
  exec(compile(src.replace(COPY, "          pass\n"), "sparse_mla_mgpu_nocopy.py", "exec"), mod.__dict__)
  return mod


def inputs(key, t, s=2048, k=2048, h=128, window=False):
  ks = jax.random.split(key, 5)
  bf = jnp.bfloat16
  if window:
    idx = ((jnp.arange(s)[:, None] + jnp.arange(k)[None, :]) % t)[None].astype(jnp.int32)
  else:
    idx = jax.random.randint(ks[4], (1, s, k), 0, t, jnp.int32)
  return (jax.random.normal(ks[0], (1, s, h, 512), bf), jax.random.normal(ks[1], (1, s, h, 64), bf),
          jax.random.normal(ks[2], (1, t, 512), bf), jax.random.normal(ks[3], (1, t, 64), bf), idx)


def compile_only(regs):
  ks = jax.random.split(jax.random.key(0), 5)
  bf = jnp.bfloat16
  a = (jax.random.normal(ks[0], (1, 4, 128, 512), bf), jax.random.normal(ks[1], (1, 4, 128, 64), bf),
       jax.random.normal(ks[2], (1, 4096, 512), bf), jax.random.normal(ks[3], (1, 4096, 64), bf),
       jax.random.randint(ks[4], (1, 4, 2048), 0, 4096, jnp.int32))
  cfg = mgpu.SparseMlaMgpuConfig(k_splits=1, registers=regs)
  jax.block_until_ready(jax.jit(lambda *x: mgpu.sparse_mla_mgpu(*x, 0.07, cfg))(*a))


def main():
  if len(sys.argv) > 1:
    return compile_only(tuple(int(v) for v in sys.argv[1:]))
  nocopy = nocopy_module()
  f = flops(1, 2048, 128, 512, 64, 2048)
  for t in (4096, 131072):
    for name, mod, window in (("random", mgpu, False), ("window", mgpu, True), ("nocopy", nocopy, False)):
      a = inputs(jax.random.key(t), t, window=window)
      sec = median_seconds(jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, 0.07)[0]), *a, iters=10)
      print(f"prefill {t:7d} {name:7s} {sec * 1e3:8.3f} ms {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
      del a
  for regs in ((232, 40), (240, 24), (224, 56), (216, 72)):
    out = subprocess.run([sys.executable, __file__, *map(str, regs)], capture_output=True, text=True,
                         env={**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1"}, timeout=120)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if "Used" in ln or "spill" in ln]
    print(f"ptxas {regs}: " + " | ".join(ln[:160] for ln in lines[-3:]), flush=True)


if __name__ == "__main__":
  sys.exit(main())
