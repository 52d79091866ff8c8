"""The losses of indexer training (DeepSeek-V3.2 report section 2.1; ``shared/reference-spec.md`` section 8).

Dense warm-up (main model frozen, dense attention)::

  p[t, :] = sum_h P[h, t, :] / ||sum_h P[h, t, :]||_1     over the keys t can see
  L_I     = sum_t KL(p[t, :] || softmax(I[t, :]))

Sparse stage (top-k selection S_t on)::

  L_I     = sum_t KL(p[t, S_t] || softmax(I[t, S_t]))      p and the softmax both over S_t only

The target p is a constant (``stop_gradient``): the KL trains the indexer alone, and in the sparse
stage the indexer's *inputs* are detached too (``train.forward``), so the main model learns only from
the language-model loss. ``sum_t`` is taken as a mean over the valid queries of the batch (a constant
factor of the report's sum, which Adam does not see).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def head_summed_target(probs: Float[Array, "b s h t"], allowed: Bool[Array, "b s t"]) -> Float[Array, "b s t"]:
  """p: the main attention summed over heads, L1-normalised over the allowed keys, float32, no gradient."""
  chex.assert_equal_shape([probs[:, :, 0, :], allowed])
  summed = jnp.where(allowed, jax.lax.stop_gradient(probs).astype(jnp.float32).sum(axis=2), 0.0)
  return summed / jnp.maximum(summed.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def kl_per_query(target: Float[Array, "b s t"], logits: Float[Array, "b s t"],
                 allowed: Bool[Array, "b s t"]) -> Float[Array, "b s"]:
  """KL(target[t] || softmax(logits[t] over allowed)) for each query; 0 for a query with no allowed key.

  Terms with target 0 contribute 0 (x log x -> 0); keys outside ``allowed`` take no part at all.
  """
  chex.assert_equal_shape([target, logits, allowed])
  log_q = jax.nn.log_softmax(jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf), axis=-1)
  log_q = jnp.where(allowed, log_q, 0.0)
  positive = allowed & (target > 0)
  log_p = jnp.log(jnp.where(positive, target, 1.0))
  kl = jnp.sum(jnp.where(positive, target * (log_p - log_q), 0.0), axis=-1)
  return jnp.where(allowed.any(axis=-1), kl, 0.0)


def indexer_kl(probs: Float[Array, "b s h t"], logits: Float[Array, "b s t"], allowed: Bool[Array, "b s t"],
               query_mask: Bool[Array, "b s"] | None = None) -> Float[Array, ""]:
  """The indexer loss of one layer: mean over queries of KL(p[t, allowed] || softmax(I[t, allowed])).

  ``allowed`` is the causal mask in the dense warm-up and the selected set S_t in the sparse stage.
  """
  kl = kl_per_query(head_summed_target(probs, allowed), logits, allowed)
  mask = allowed.any(axis=-1) if query_mask is None else query_mask & allowed.any(axis=-1)
  return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(mask.sum(), 1)


def lm_loss(logits: Float[Array, "b s v"], targets: Int[Array, "b s"],
            mask: Bool[Array, "b s"] | None = None) -> Float[Array, ""]:
  """Mean next-token cross-entropy in float32 (over the masked positions)."""
  chex.assert_equal_shape([logits[..., 0], targets])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if mask is None:
    return nll.mean()
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(mask.sum(), 1)
