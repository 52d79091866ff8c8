"""Session 23, call 5: one 128K prefill's DSA selection (indexer logits + top-k over the model's 2048-query
blocks, 671B shapes), with the logits kernel writing -inf into every key tile past a block's last visible key
(as before) and leaving them unwritten (skip_invisible=True, the model's setting now), side by side; both
must select the same keys."""
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.indexer_gpu import inputs
from benchmarks.timing import median_seconds
from dsv32_jax.attention import map_query_blocks
from pallas_kernels import dispatch

T, BLOCK = 131072, 2048
q8, w, k8, ks = inputs(jax.random.key(0), 1, T, T)
positions = jnp.arange(T, dtype=jnp.int32)[None]


def selection(skip):
  def one_block(q, w_, pos):
    logits = dispatch.index_logits(q, w_, k8, ks, pos, skip_invisible=skip)
    return dispatch.topk(logits, 2048, pos + 1)
  return jax.jit(lambda q, w_, pos: map_query_blocks(one_block, BLOCK, q, w_, pos))


runs = {skip: selection(skip) for skip in (False, True)}
picked = {skip: np.sort(np.asarray(fn(q8, w, positions)[0, -4096::97]), axis=-1) for skip, fn in runs.items()}
print(f"same selections (every 97th of the last 4096 queries): {np.array_equal(picked[False], picked[True])}",
      flush=True)
for _ in range(2):
  for skip, fn in runs.items():
    sec = median_seconds(fn, q8, w, positions, iters=3)
    print(f"128K selection, invisible tiles {'unwritten' if skip else 'written -inf'}: {sec * 1e3:8.2f} ms", flush=True)
