"""Session 23, call 4: wave quantisation. A 2048-query block gives the sparse MLA kernel 4096 CTAs (one an SM:
31.03 waves on 132 SMs) and the logits kernel 512 (4 queries a CTA); 2112 = 132 x 16 queries fill the last
wave. Time per query of each kernel at the end of a 128K context, for blocks of 2048, 2112, 4096, 4224."""
import jax
import jax.numpy as jnp

from benchmarks.indexer_gpu import inputs as logits_inputs
from benchmarks.sparse_mla_mgpu_check import inputs as mla_inputs
from benchmarks.timing import median_seconds
from pallas_kernels.indexer_logits_mgpu import index_logits_mgpu
from pallas_kernels.sparse_mla_mgpu import sparse_mla_mgpu

T = 131072
q8, w, k8, ks = logits_inputs(jax.random.key(1), 1, 4224, T)
mla = mla_inputs(jax.random.key(2), 1, 4224, 128, T, 2048)
logits = jax.jit(index_logits_mgpu)
attend = jax.jit(lambda *a: sparse_mla_mgpu(*a, 0.0721)[0])
for s in (2048, 2112, 4096, 4224):
  pos = (T - s + jnp.arange(s, dtype=jnp.int32))[None]
  t_logits = median_seconds(logits, q8[:, :s], w[:, :s], k8, ks, pos, iters=10)
  t_mla = median_seconds(attend, *(a[:, :s] if a.ndim > 2 and a.shape[1] == 4224 else a for a in mla), iters=10)
  print(f"{s:5d} queries: logits {t_logits * 1e3:7.3f} ms ({t_logits / s * 1e6:6.3f} us/query)   "
        f"sparse MLA {t_mla * 1e3:7.3f} ms ({t_mla / s * 1e6:6.3f} us/query)", flush=True)
