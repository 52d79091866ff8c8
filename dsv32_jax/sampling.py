"""Next-token sampling: greedy, temperature, and nucleus (top-p)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0   # 0: greedy (argmax)
  top_p: float = 1.0         # keep the smallest set of tokens whose probability reaches top_p

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature = {self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p = {self.top_p} must lie in (0, 1]")


def top_p_mask(logits: Float[Array, "b v"], top_p: float) -> Float[Array, "b v"]:
  """Logits with every token outside the nucleus set to -inf (the most likely token is always kept)."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs        # mass of the more likely tokens
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def sample(logits: Float[Array, "b v"], key: jax.Array, params: SamplingParams) -> Int[Array, "b"]:
  logits = logits.astype(jnp.float32)
  if params.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / params.temperature
  if params.top_p < 1.0:
    logits = top_p_mask(logits, params.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
