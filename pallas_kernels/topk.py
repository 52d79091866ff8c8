"""Exact top-k of long rows by segment-maximum pruning (the selection step of DSA).

``jax.lax.top_k(k=2048)`` over 131072-wide rows sorts every row (19 ms for 2048 rows on an H100).
Only a few thousand of a row's values can matter, and they can be found without sorting it:

  1. split the row into segments of ``segment`` values and take each segment's maximum;
  2. the k segments with the largest maxima (ties: lower segment first) contain the row's top k:
     every value above the k-th largest v lies in a segment whose maximum exceeds v, and there are
     fewer than k such values, hence fewer than k such segments; the tied values at v that the tie
     rule keeps are the lowest-indexed ones, whose segments win the remaining slots in index order;
  3. gather those segments (k * segment candidates, in index order) and take the top k of them.

Both top-k calls are over ``T / segment`` and ``k * segment`` values instead of ``T``.
The result equals ``dsv32_jax.indexer.select_topk`` exactly: the same set (ties to the lower key
index) with -1 for slots beyond the row's finite values; only the order within a row may differ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax.indexer import select_topk as reference  # noqa: F401  (the reference this matches)


@dataclasses.dataclass(frozen=True)
class TopkConfig:
  segment: int = 8  # values per segment; candidates = k * segment


def topk_pruned(logits: Float[Array, "... t"], k: int, config: TopkConfig = TopkConfig()) -> Int[Array, "... k"]:
  """Indices of the k largest values of each row (ties to the lower index), -1 for -inf values."""
  *lead, t = logits.shape
  g = config.segment
  if t <= k * g:  # nothing to prune
    values, idx = jax.lax.top_k(logits, k)
    return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32)
  n_seg = -(-t // g)
  padded = jnp.pad(logits, [(0, 0)] * len(lead) + [(0, n_seg * g - t)], constant_values=-jnp.inf)
  segments = padded.reshape(*lead, n_seg, g)
  _, best = jax.lax.top_k(segments.max(axis=-1), k)          # the k segments that hold the top k
  best = jnp.sort(best, axis=-1)                              # index order: ties resolve to lower keys
  candidates = jnp.take_along_axis(segments, best[..., None], axis=-2).reshape(*lead, k * g)
  values, pos = jax.lax.top_k(candidates, k)
  idx = best[..., pos // g] if not lead else jnp.take_along_axis(best, pos // g, axis=-1)
  idx = idx * g + pos % g
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32)
