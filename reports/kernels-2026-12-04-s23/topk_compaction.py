"""Session 23, call 7: the top-k's compaction pass loading only the segments whose maximum reaches the
threshold (this tree) against loading every value of the row (main at 996bb1a, carried as .bench_old/),
side by side inside one 128K prefill's selection (logits kernel + top-k over 2048-query blocks, 671B shapes,
invisible tiles unwritten); both must select the same keys."""
import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.indexer_gpu import inputs
from benchmarks.timing import median_seconds
from dsv32_jax.attention import map_query_blocks
from pallas_kernels import dispatch
from pallas_kernels import topk_gpu as new

spec = importlib.util.spec_from_file_location("topk_gpu_head", ".bench_old/topk_gpu_head.py")
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)

T, BLOCK = 131072, 2048
q8, w, k8, ks = inputs(jax.random.key(0), 1, T, T)
positions = jnp.arange(T, dtype=jnp.int32)[None]


def selection(module):
  def one_block(q, w_, pos):
    logits = dispatch.index_logits(q, w_, k8, ks, pos, skip_invisible=True)
    return module.topk_gpu(logits[0], 2048, pos[0] + 1)[None]
  return jax.jit(lambda q, w_, pos: map_query_blocks(one_block, BLOCK, q, w_, pos))


runs = {"every value": selection(old), "live segments": selection(new)}
picked = {name: np.sort(np.asarray(fn(q8, w, positions)[0, -6144::61]), axis=-1) for name, fn in runs.items()}
print(f"same selections (every 61st of the last 6144 queries): "
      f"{np.array_equal(picked['every value'], picked['live segments'])}", flush=True)
for _ in range(2):
  for name, fn in runs.items():
    sec = median_seconds(fn, q8, w, positions, iters=3)
    print(f"128K selection, compaction loads {name:13s}: {sec * 1e3:8.2f} ms", flush=True)
