"""Recall of ``jax.lax.approx_max_k`` at DSA's top-2048, with its TPU algorithm emulated on the CPU.

On a TPU, ``approx_max_k(x, k, recall_target)`` is XLA's ApproxTopK: a ``PartialReduce`` keeps the
maximum of each of ``L`` bins (``L`` from ``approx_top_k_reduction_output_size``, the function XLA
itself uses), then an exact top-k of the ``L`` bin maxima. On the CPU, JAX runs an exact sort
instead, so the recall cannot be measured by calling it here. This script emulates the TPU
algorithm with *strided* bins (element ``i`` in bin ``i mod L``, the reduction over the major axis of
a ``[N/L, L]`` view that keeps the 128-lane axis) and, as a bound, with *contiguous* bins; which
layout the TPU's PartialReduce uses is to be confirmed on a TPU (docs/tpu.md).

  PYTHONPATH=. python benchmarks/tpu_topk_recall.py
"""

from __future__ import annotations

import numpy as np
from jax._src.lib import _jax

K = 2048


def bins(t: int, k: int, recall_target: float) -> int:
  return _jax.approx_top_k_reduction_output_size(t, 2, k, recall_target, False, -1)[0]


def exact_topk(x: np.ndarray, k: int) -> np.ndarray:
  return np.argpartition(-x, k - 1, axis=-1)[:, :k]


def emulated_approx_topk(x: np.ndarray, k: int, recall_target: float, layout: str) -> np.ndarray:
  rows, t = x.shape
  n_bins = bins(t, k, recall_target)
  if n_bins >= t:
    return exact_topk(x, k)
  per_bin = t // n_bins
  if layout == "strided":   # bin b = {b, b + L, b + 2L, ...}
    view = x.reshape(rows, per_bin, n_bins)
    winner = view.argmax(axis=1)                                      # [rows, L]
    index = winner * n_bins + np.arange(n_bins)
  else:                     # bin b = {b*P, ..., b*P + P - 1}
    view = x.reshape(rows, n_bins, per_bin)
    winner = view.argmax(axis=2)
    index = np.arange(n_bins) * per_bin + winner
  maxima = np.take_along_axis(x, index, axis=1)
  chosen = exact_topk(maxima, k)
  return np.take_along_axis(index, chosen, axis=1)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
  hits = [len(np.intersect1d(a, e, assume_unique=True)) for a, e in zip(approx, exact)]
  return float(np.mean(hits)) / exact.shape[1]


def logits(kind: str, rows: int, t: int, rng) -> np.ndarray:
  if kind == "iid":
    return rng.standard_normal((rows, t)).astype(np.float32)
  # "clustered": an AR(1) walk along the keys (neighbours correlated, rho = 0.95) plus noise, so the
  # top keys come in runs, as DSA's selections of neighbouring tokens do.
  noise = rng.standard_normal((rows, t)).astype(np.float32)
  walk = np.empty_like(noise)
  walk[:, 0] = noise[:, 0]
  rho = np.float32(0.95)
  for i in range(1, t):
    walk[:, i] = rho * walk[:, i - 1] + np.sqrt(1 - rho * rho) * noise[:, i]
  return walk + 0.3 * rng.standard_normal((rows, t)).astype(np.float32)


def main():
  rng = np.random.default_rng(0)
  print("| keys T | recall_target | bins L (keys per bin) | data | recall, strided bins | recall, contiguous bins |")
  print("|---|---|---|---|---|---|")
  for t in (32768, 65536, 131072):
    for kind in ("iid", "clustered"):
      x = logits(kind, 16, t, rng)
      exact = exact_topk(x, K)
      for target in (0.95, 0.9, 0.8):
        n_bins = bins(t, K, target)
        strided = recall(emulated_approx_topk(x, K, target, "strided"), exact)
        contiguous = recall(emulated_approx_topk(x, K, target, "contiguous"), exact)
        print(f"| {t} | {target} | {n_bins} ({t // n_bins}) | {kind} | {strided:.4f} | {contiguous:.4f} |")


if __name__ == "__main__":
  main()
