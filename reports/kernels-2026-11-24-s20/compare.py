"""Session 20: kernel variants side by side (H100): ptxas's spills, numerics against the float32
reference (short selections, -1 slots; k_splits 1 / 3 / auto, so that some splits see no valid slot)
and prefill at 4K and 128K (2048 queries x top-k 2048, random indices).

  python3 compare.py NAME=PATH ...       (PATH: a copy of pallas_kernels/sparse_mla_mgpu.py)
"""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import median_seconds, rel_err
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels.sparse_mla_gpu import flops


def load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def inputs(key, b, s, t, k=2048, h=128, short=False):
  ks = jax.random.split(key, 5)
  bf = jnp.bfloat16
  idx = jax.random.randint(ks[4], (b, s, k), 0, t, jnp.int32)
  if short:
    n = jnp.minimum(jnp.arange(s) * 300 + 1, k)
    idx = jnp.where(jnp.arange(k)[None, None, :] < n[None, :, None], idx, -1)
  return (jax.random.normal(ks[0], (b, s, h, 512), bf), jax.random.normal(ks[1], (b, s, h, 64), bf),
          jax.random.normal(ks[2], (b, t, 512), bf), jax.random.normal(ks[3], (b, t, 64), bf), idx)


def compile_only(mod):
  a = inputs(jax.random.key(0), 1, 4, 4096)
  cfg = mod.SparseMlaMgpuConfig(k_splits=1)
  jax.block_until_ready(jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, 0.07, cfg))(*a))


def main(args):
  if args[0] == "--compile":
    return compile_only(load("variant", args[1]))
  variants = [a.split("=", 1) for a in args]
  for name, path in variants:
    out = subprocess.run([sys.executable, __file__, "--compile", path], capture_output=True, text=True,
                         env={**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1"}, timeout=120)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if "stack frame" in ln or "Used" in ln]
    print(f"ptxas {name}: " + " | ".join(lines[-2:]), flush=True)
  mods = [(name, load(name, path)) for name, path in variants]
  scale = 0.07
  a = inputs(jax.random.key(1), 2, 9, 5000, short=True)
  ref = sparse_attention_scaled(scale, *(x.astype(jnp.float32) for x in a[:4]), a[4])
  for name, mod in mods:
    for splits in (1, 3, None):
      got, lse = jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, scale, mod.SparseMlaMgpuConfig(k_splits=splits)))(*a)
      print(f"check {name} k_splits {splits}: {rel_err(got.astype(jnp.float32), ref):.2e}  "
            f"finite lse {bool(jnp.isfinite(lse).all())}", flush=True)
  f = flops(1, 2048, 128, 512, 64, 2048)
  for t in (4096, 131072):
    a = inputs(jax.random.key(t), 1, 2048, t)
    for name, mod in mods:
      sec = median_seconds(jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, scale)[0]), *a, iters=10)
      print(f"prefill {t:7d} {name:6s} {sec * 1e3:8.3f} ms {f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
