"""Tilings of the exact top-k kernel (``pallas_kernels/topk_gpu.py``) on a GPU, side by side.

  PYTHONPATH=. python3 benchmarks/topk_gpu_sweep.py --out $OUT/topk_sweep.json

Each config (values per step / warps / pipeline stages / threshold bits a pass) is first checked against the reference's sets
computed on the host in float32's total order (-0.0 < +0.0, as ``lax.top_k`` on a CPU and the kernel),
on rows with many ties and short causal rows, then timed on the prefill rows of the DSA target (2048
causal rows at the end of a 128K context, and full rows) and on decode rows (batch 1 / 32 / 128 of
128K). A config that fails to compile is reported and skipped; the check's verdict is printed with
each config's rows.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Table, median_seconds
from pallas_kernels.topk_gpu import TopkGpuConfig, topk_gpu

K = 2048
report = Table(62)


def parse_config(text: str) -> TopkGpuConfig:
  """block,warps,stages[,search_bits[,full]]: "full" settles all 32 bits of the searches (no early stop)."""
  values = text.split(",")
  return TopkGpuConfig(block=int(values[0]), num_warps=int(values[1]), num_stages=int(values[2]),
                       search_bits=int(values[3]) if len(values) > 3 else 1, stop_early=values[4:] != ["full"])


def stable_topk_sets(rows: np.ndarray, k: int) -> np.ndarray:
  """The reference's sets on the host: the k largest in the total order of float32 (-0.0 < +0.0, as
  ``lax.top_k`` on a CPU and the kernel), ties to the lower index, -1 for -inf values."""
  bits = rows.astype(np.float32).view(np.int32).astype(np.int64)
  keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
  order = np.argsort(-keys, axis=-1, kind="stable")[:, :k]
  return np.sort(np.where(np.take_along_axis(rows, order, -1) == -np.inf, -1, order), -1)


def agrees(config: TopkGpuConfig) -> bool:
  rng = np.random.default_rng(0)
  rows = np.round(rng.standard_normal((64, 40960)) * 8).astype(np.float32)  # many ties
  lengths = rng.integers(1, 40960, 64).astype(np.int32)
  lengths[:4] = (5, 2047, 2048, 4100)
  rows = np.where(np.arange(40960)[None] < lengths[:, None], rows, -np.inf)
  got = np.sort(np.asarray(topk_gpu(jnp.asarray(rows), K, jnp.asarray(lengths), config)), -1)
  return bool((got == stable_topk_sets(rows, K)).all())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--context", type=int, default=131072)
  # Default: the kernel's prefill and decode tilings, each with the searches' early stop and without.
  ap.add_argument("--configs", nargs="*", default=["2048,4,1", "2048,4,1,1,full", "8192,16,1", "8192,16,1,1,full"],
                  help="block,warps,stages[,search_bits[,full]] per config")
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  L, s = args.context, 2048
  key = jax.random.key(1)
  pos = L - s + jnp.arange(s, dtype=jnp.int32)
  causal = jnp.where(jnp.arange(L)[None] <= pos[:, None], jax.random.normal(key, (s, L), jnp.float32), -jnp.inf)
  full = jax.random.normal(jax.random.key(2), (s, L), jnp.float32)
  decode = {b: jax.random.normal(jax.random.key(b), (b, L), jnp.float32) for b in (1, 32, 128)}
  report(f"lax.top_k, {s} causal rows x {L}", median_seconds(jax.jit(lambda x: jax.lax.top_k(x, K)[1]), causal, iters=3))
  for text in args.configs:
    config = parse_config(text)
    name = (f"block {config.block} / {config.num_warps} warps / {config.num_stages} stages / "
            f"{config.search_bits} search bits{'' if config.stop_early else ' / all 32 passes'}")
    try:
      ok = agrees(config)
      run = jax.jit(lambda x, n, config=config: topk_gpu(x, K, n, config))
      report(f"{name}: {s} causal rows", median_seconds(run, causal, pos + 1, iters=5), equal=str(ok))
      report(f"{name}: {s} full rows", median_seconds(run, full, jnp.full((s,), L, jnp.int32), iters=5))
      for b, rows in decode.items():
        report(f"{name}: decode batch {b}", median_seconds(run, rows, jnp.full((b,), L, jnp.int32)))
    except Exception as e:  # one failing tiling must not lose the run
      print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "rows": report.rows}, f, indent=2)


if __name__ == "__main__":
  main()
