"""A short prefill's top-k sets as the masked-attention kernel's bits: from the logits directly
(``pallas_kernels.topk_bits_gpu``) against the indices path it replaces (``dispatch.topk`` -- ``lax.top_k`` for
rows of at most 2k values, the top-k kernel beyond -- then the scatter and packing of ``index_bits``).

Rows as a fresh prefill scores them: query q of a prompt of t tokens sees keys 0..q, and only the queries past
index_topk = 2048 are scored (a 4K prompt: 2048 rows of 2049..4096 visible values). Float32 logits with ties
(rounded), what the rows hold past their lengths is garbage. Each path is checked against the other first.

  PYTHONPATH=. python3 benchmarks/topk_bits_gpu.py [--lengths 4096 8192] [--configs 4096,4 4096,8] [--out F.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from pallas_kernels import dispatch
from pallas_kernels import masked_mha_mgpu as mm
from pallas_kernels.topk_bits_gpu import TopkBitsConfig, topk_bits_gpu

TOPK = 2048


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192])
  ap.add_argument("--configs", nargs="*", default=["4096,4", "4096,8", "8192,8"], help="block,num_warps")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  print("device:", jax.devices()[0].device_kind, flush=True)
  results = {"device": jax.devices()[0].device_kind, "times_ms": {}, "equal": {}}
  for t in args.lengths:
    rows = t - TOPK
    key = jax.random.fold_in(jax.random.key(0), t)
    logits = jnp.round(jax.random.normal(key, (rows, t), jnp.float32) * 64)  # ties
    lengths = jnp.arange(TOPK + 1, t + 1, dtype=jnp.int32)                   # causal rows

    @jax.jit
    def by_indices(x, n):  # the path before: indices, then a boolean scatter, packed
      return mm.index_bits(dispatch.topk(x, TOPK, n), x.shape[1])

    want = np.asarray(by_indices(logits, lengths))

    def time(name, fn, *a):
      ms = median_seconds(fn, *a, iters=args.iters) * 1e3
      results["times_ms"][f"{t}: {name}"] = ms
      print(f"{t:6d} keys, {rows:5d} rows: {name:48s} {ms:8.3f} ms", flush=True)

    time("indices (dispatch.topk) + index_bits", by_indices, logits, lengths)
    time("indices alone (dispatch.topk)", jax.jit(lambda x, n: dispatch.topk(x, TOPK, n)), logits, lengths)
    for text in args.configs:
      block, warps = map(int, text.split(","))
      cfg = TopkBitsConfig(block=block, num_warps=warps)
      fn = jax.jit(lambda x, n, cfg=cfg: topk_bits_gpu(x, TOPK, n, cfg))
      same = bool((np.asarray(fn(logits, lengths)) == want).all())
      results["equal"][f"{t}: {text}"] = same
      print(f"  bits kernel {text}: equal to the indices path: {same}", flush=True)
      time(f"bits kernel {text}", fn, logits, lengths)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
