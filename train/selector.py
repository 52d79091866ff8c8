"""The lightning indexer and the top-k selector as trainable, configurable functions.

The release's indexer (``dsv32_jax.indexer``, paper eq. (1))::

  I[t,s] = sum_h w[t,h] * ReLU(q[t,h] . k[s]),   q, k Hadamard-rotated and rounded to FP8 e4m3

``IndexerVariant`` names the research knobs of the ablation harness; ``RELEASE`` is the release's
choice. Everything reuses the model's own building blocks: ``indexer.indexer_keys`` and
``indexer.indexer_queries`` (unquantised) give q, k and the head weights ``w``
(``weights_proj(x) * H**-0.5 * D**-0.5``); this module only adds what training needs:

- FP8 as a *straight-through* fake quantisation: the forward is ``act_quant`` exactly (e4m3 values,
  ue8m0 power-of-two scale per head vector); the backward is the identity, since the derivative of a
  rounding is zero almost everywhere and a cast of the cotangent to e4m3 would quantise the gradient;
- ``score = "softmax"``: each head's ReLU scores replaced by its softmax over the visible keys
  (I[t,s] = sum_h w[t,h] softmax_s(q[t,h] . k[s])), an attention-like importance as NSA uses;
- ``head_weights = False``: w[t,h] = H**-0.5 * D**-0.5 for every head (no ``weights_proj``);
- ``hadamard``: the rotation before quantisation (a no-op without FP8: it is orthonormal);
- selection of the top-k *tokens* per query, or of the top ``k / block`` *blocks* of ``block`` keys
  (NSA-style), a block scoring the max of its keys' logits; k is absolute (``cfg.index_topk``) or a
  fraction of the visible context (``topk_fraction``).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from dsv32_jax import indexer, quant
from dsv32_jax.attention import selection_mask
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import matmul

SCORES = ("relu", "softmax")
SCORE_DTYPES = ("fp8", "bfloat16", "float32")
GRANULARITIES = ("token", "block")


@dataclasses.dataclass(frozen=True)
class IndexerVariant:
  """How the indexer scores keys and how the selector picks them (static under ``jit``)."""

  score: str = "relu"                 # "relu" (release) | "softmax" (per-head softmax over keys)
  score_dtype: str = "fp8"            # q, k rounded to "fp8" e4m3 (release), "bfloat16", or kept "float32"
  hadamard: bool = True               # rotate q and k before rounding (release)
  head_weights: bool = True           # per-query head weights from weights_proj (release)
  granularity: str = "token"          # "token" (release) | "block" (contiguous key blocks, NSA-style)
  block: int = 64                     # keys per block when granularity == "block"
  topk_fraction: float | None = None  # k = ceil(fraction * keys) instead of cfg.index_topk

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(f"IndexerVariant.score = {self.score!r}: expected one of {SCORES}")
    if self.score_dtype not in SCORE_DTYPES:
      raise ValueError(f"IndexerVariant.score_dtype = {self.score_dtype!r}: expected one of {SCORE_DTYPES}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"IndexerVariant.granularity = {self.granularity!r}: expected one of {GRANULARITIES}")
    if self.block <= 0:
      raise ValueError(f"IndexerVariant.block = {self.block} must be positive")
    if self.topk_fraction is not None and not 0.0 < self.topk_fraction <= 1.0:
      raise ValueError(f"IndexerVariant.topk_fraction = {self.topk_fraction} must lie in (0, 1]")

  def replace(self, **changes) -> "IndexerVariant":
    return dataclasses.replace(self, **changes)

  def topk(self, cfg: ModelConfig, n_keys: int) -> int:
    """Keys selected per query for a context of n_keys keys."""
    if self.topk_fraction is None:
      return cfg.index_topk
    return max(1, math.ceil(self.topk_fraction * n_keys - 1e-9))


RELEASE = IndexerVariant()
"""The released indexer: ReLU scores, Hadamard + FP8 e4m3, per-head weights, top-k tokens."""


def straight_through(x: Array, rounded: Array) -> Array:
  """rounded in the forward pass, the identity's derivative in the backward pass."""
  return x + jax.lax.stop_gradient(rounded.astype(x.dtype) - x)


def _round(v: IndexerVariant, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """q or k as the scores see it: Hadamard-rotated and rounded as the variant says (straight-through)."""
  x = x.astype(jnp.float32)
  if v.hadamard:
    x = indexer.hadamard(x)
  if v.score_dtype == "fp8":
    return straight_through(x, quant.fake_quant(x, x.shape[-1]))  # one ue8m0 scale per head vector
  if v.score_dtype == "bfloat16":
    return straight_through(x, x.astype(jnp.bfloat16))
  return x


def index_logits(v: IndexerVariant, p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], qr: Float[Array, "b s q"],
                 cos, sin, allowed: Bool[Array, "b s t"]) -> Float[Array, "b s t"]:
  """I[b,t,s] in float32 for queries and keys of the same sequence x (a prefill); -inf where not allowed."""
  b, s, _ = x.shape
  chex.assert_shape(qr, (b, s, cfg.q_lora_rank))
  chex.assert_shape(allowed, (b, s, s))
  k, _ = indexer.indexer_keys(p, cfg, x, cos, sin, quantize=False)            # [B,T,D]
  q, w = indexer.indexer_queries(p, cfg, x, qr, cos, sin, quantize=False)     # [B,S,H,D], [B,S,H]
  if not v.head_weights:
    w = jnp.full(w.shape, (cfg.index_n_heads * cfg.index_head_dim) ** -0.5, jnp.float32)
  q, k = _round(v, q), _round(v, k)
  dots = matmul("bshd,btd->bsht", q, k, jnp.float32)
  if v.score == "relu":
    scores = jax.nn.relu(dots)
  else:
    scores = jax.nn.softmax(jnp.where(allowed[:, :, None, :], dots, -jnp.inf), axis=-1)
  logits = matmul("bsht,bsh->bst", scores, w.astype(jnp.float32), jnp.float32)
  return jnp.where(allowed, logits, -jnp.inf)


def select(v: IndexerVariant, cfg: ModelConfig, logits: Float[Array, "b s t"],
           allowed: Bool[Array, "b s t"]) -> Bool[Array, "b s t"]:
  """The selected keys S_t as a mask (inside ``allowed``); no gradient flows through a selection.

  Token granularity: the k largest logits (``indexer.select_topk``: ties to the lower index; rows
  with at most k allowed keys keep them all). Block granularity: the ``ceil(k / block)`` blocks of
  ``block`` consecutive keys with the largest max-logit.
  """
  b, s, t = logits.shape
  logits = jax.lax.stop_gradient(jnp.where(allowed, logits, -jnp.inf))
  k = min(v.topk(cfg, t), t)
  if v.granularity == "token":
    return selection_mask(indexer.select_topk(logits, k), t) & allowed
  nb = -(-t // v.block)
  padded = jnp.pad(logits, [(0, 0), (0, 0), (0, nb * v.block - t)], constant_values=-jnp.inf)
  block_scores = padded.reshape(b, s, nb, v.block).max(axis=-1)
  kb = min(-(-k // v.block), nb)
  chosen = selection_mask(indexer.select_topk(block_scores, kb), nb)
  return jnp.repeat(chosen, v.block, axis=-1)[..., :t] & allowed
