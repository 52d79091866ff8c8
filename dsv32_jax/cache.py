"""The inference cache: per layer, the MLA latent and the indexer's keys, one slot per position.

Per token and layer (671B sizes): the latent ``kv`` (512) and ``k_pe`` (64) in the activation dtype
-- already rounded through FP8 when the latent quantisation is on, as the December official code
does -- and the indexer key, 128 e4m3 values with one float32 scale (132 bytes), as DeepGEMM's and
vLLM's indexer caches hold it. Slot ``t`` of sequence ``b`` holds the token at position ``t``;
sequences of a batch may have different lengths (each step writes at its own ``start[b]``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax.config import ModelConfig
from dsv32_jax.quant import FP8


class LayerCache(NamedTuple):
  """One layer's cache (or all layers', with a leading layer axis)."""

  kv: Float[Array, "*l b t c"]              # MLA latent (kv_lora_rank)
  k_pe: Float[Array, "*l b t r"]            # roped MLA key part shared by all heads
  index_k: Float[Array, "*l b t d"]         # indexer keys: e4m3, or the activation dtype unquantised
  index_k_scale: Float[Array, "*l b t"]     # their float32 scales (1 when unquantised)

  @property
  def max_len(self) -> int:
    return self.kv.shape[-2]


def init_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype,
               indexer_quant: bool = True) -> LayerCache:
  lead = (n_layers, batch, max_len)
  return LayerCache(
      kv=jnp.zeros((*lead, cfg.kv_lora_rank), dtype),
      k_pe=jnp.zeros((*lead, cfg.qk_rope_head_dim), dtype),
      index_k=jnp.zeros((*lead, cfg.index_head_dim), FP8 if indexer_quant else dtype),
      index_k_scale=jnp.zeros(lead, jnp.float32),
  )


def write(cache: LayerCache, layer: Int[Array, ""], start: Int[Array, "b"], new: LayerCache) -> LayerCache:
  """Writes new [B,S,...] entries at slots start[b]..start[b]+S-1 of one layer of a stacked cache.

  Callers guarantee start + S <= max_len (generate checks it on the host): dynamic_update_slice
  would otherwise clamp the write window.
  """
  def write_one(stacked, values):
    def per_sequence(slots, vals, s):
      return jax.lax.dynamic_update_slice_in_dim(slots, vals.astype(slots.dtype), s, axis=0)
    layer_slots = jax.vmap(per_sequence)(stacked[layer], values, start)
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_slots, layer, axis=0)

  return jax.tree.map(write_one, cache, new)


def read(cache: LayerCache, layer: Int[Array, ""], length: int) -> LayerCache:
  """The first `length` slots (static) of one layer of a stacked cache."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)[:, :length], cache)
