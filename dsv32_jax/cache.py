"""The inference cache: per layer, the MLA latent and the indexer's keys, one slot per position.

Per token and layer (671B sizes): the latent ``kv`` (512) and ``k_pe`` (64) in the activation dtype
-- already rounded through FP8 when the latent quantisation is on, as the December official code
does -- or, with ``latent_fp8``, the latent as those e4m3 values with a float32 scale per 128
(``kv_scale``; FlashMLA's 656-byte layout, the same values in 57% of the bytes); and the indexer key,
128 e4m3 values with one float32 scale (132 bytes), as DeepGEMM's and vLLM's indexer caches hold it. Slot ``t`` of sequence ``b`` holds the token at position ``t``;
sequences of a batch may have different lengths (each step writes at its own ``start[b]``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax.config import FP8_BLOCK, ModelConfig
from dsv32_jax.quant import FP8, act_dequant, act_quant


class LayerCache(NamedTuple):
  """One layer's cache (or all layers', with a leading layer axis)."""

  kv: Float[Array, "*l b t c"]              # MLA latent (kv_lora_rank)
  k_pe: Float[Array, "*l b t r"]            # roped MLA key part shared by all heads
  index_k: Float[Array, "*l b t d"]         # indexer keys: e4m3, or the activation dtype unquantised
  index_k_scale: Float[Array, "*l b t"]     # their float32 scales (1 when unquantised)
  kv_scale: Float[Array, "*l b t cb"]       # the e4m3 latent's scale per 128 values; cb = 0 for a bf16 latent

  @property
  def max_len(self) -> int:
    return self.kv.shape[-2]


  @property
  def latent_fp8(self) -> bool:
    return self.kv.dtype == FP8


def init_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype,
               indexer_quant: bool = True, latent_fp8: bool = False) -> LayerCache:
  lead = (n_layers, batch, max_len)
  if latent_fp8 and cfg.kv_lora_rank % FP8_BLOCK:
    raise ValueError(f"an e4m3 latent cache needs kv_lora_rank = {cfg.kv_lora_rank} to be a multiple of {FP8_BLOCK}")
  return LayerCache(
      kv=jnp.zeros((*lead, cfg.kv_lora_rank), FP8 if latent_fp8 else dtype),
      k_pe=jnp.zeros((*lead, cfg.qk_rope_head_dim), dtype),
      index_k=jnp.zeros((*lead, cfg.index_head_dim), FP8 if indexer_quant else dtype),
      index_k_scale=jnp.zeros(lead, jnp.float32),
      kv_scale=jnp.zeros((*lead, cfg.kv_lora_rank // FP8_BLOCK if latent_fp8 else 0), jnp.float32),
  )


def new_entries(cache: LayerCache, c: Float[Array, "b s c"], k_pe, index_k, index_k_scale) -> LayerCache:
  """This step's entries in the cache's layout: the latent as it is, or as e4m3 + scales (lossless:
  c is already rounded through FP8, and re-quantising it only moves power-of-two scales)."""
  if cache.latent_fp8:
    kv, kv_scale = act_quant(c)
  else:
    kv, kv_scale = c, jnp.zeros((*c.shape[:-1], 0), jnp.float32)
  return LayerCache(kv=kv, k_pe=k_pe, index_k=index_k, index_k_scale=index_k_scale, kv_scale=kv_scale)


def latent(keys: LayerCache, dtype) -> Float[Array, "*l b t c"]:
  """The cached latent in the activation dtype (dequantised from e4m3 when the cache holds it so)."""
  return act_dequant(keys.kv, keys.kv_scale, dtype) if keys.latent_fp8 else keys.kv


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
