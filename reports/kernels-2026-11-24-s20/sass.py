"""Compiles the kernel once (run with MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=dir) to find its spills."""
import jax
import jax.numpy as jnp

from pallas_kernels import sparse_mla_mgpu as mgpu

ks = jax.random.split(jax.random.key(0), 5)
bf = jnp.bfloat16
a = (jax.random.normal(ks[0], (1, 4, 128, 512), bf), jax.random.normal(ks[1], (1, 4, 128, 64), bf),
     jax.random.normal(ks[2], (1, 4096, 512), bf), jax.random.normal(ks[3], (1, 4096, 64), bf),
     jax.random.randint(ks[4], (1, 4, 2048), 0, 4096, jnp.int32))
jax.block_until_ready(jax.jit(lambda *x: mgpu.sparse_mla_mgpu(*x, 0.07, mgpu.SparseMlaMgpuConfig(k_splits=1)))(*a))
