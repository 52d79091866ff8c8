"""Compiles session 18's and this session's kernel once (run with MOSAIC_GPU_DUMP_PTXAS=1)."""
import sys
import importlib.util
import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels import sparse_mla_mgpu as new

spec = importlib.util.spec_from_file_location("s18", pathlib.Path(__file__).with_name("sparse_mla_mgpu_s18.py"))
old = sys.modules["s18"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
ks = jax.random.split(jax.random.key(0), 5)
bf = jnp.bfloat16
a = (jax.random.normal(ks[0], (1, 4, 128, 512), bf), jax.random.normal(ks[1], (1, 4, 128, 64), bf),
     jax.random.normal(ks[2], (1, 4096, 512), bf), jax.random.normal(ks[3], (1, 4096, 64), bf),
     jax.random.randint(ks[4], (1, 4, 2048), 0, 4096, jnp.int32))
for name, mod in (("s18", old), ("s19", new)):
  print(f"===== {name}", flush=True)
  jax.block_until_ready(jax.jit(lambda *x: mod.sparse_mla_mgpu(*x, 0.07, mod.SparseMlaMgpuConfig(k_splits=1)))(*a))
  print(f"===== {name} done", flush=True)
