"""The DeepSeek-V3.2 transformer as pure functions over the parameter pytree.

``h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h))`` with a dense SwiGLU FFN for the first
``n_dense_layers`` and the MoE after; each group of layers runs under ``jax.lax.scan`` so compile
time does not grow with depth. The residual stream is rounded to the activation dtype after every
add (computed in float32), as the official fused-residual RMSNorm does. The output head runs in
float32, as the official ``head``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax import cache as cache_lib
from dsv32_jax.attention import attention
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import linear, rms_norm, swiglu
from dsv32_jax.moe import moe
from dsv32_jax.options import RunOptions
from dsv32_jax.params import Params
from dsv32_jax.rope import rope_angles


RESIDUAL_AXES = ("batch", "sequence", "embed")  # logical axes of the residual stream [B, S, D]


def residual_add(h, delta):
  return (h.astype(jnp.float32) + delta.astype(jnp.float32)).astype(h.dtype)


def block(p: dict, cfg: ModelConfig, opts: RunOptions, h: Float[Array, "b s d"], cache, layer, start, kv_len: int,
          cos, sin, is_moe: bool):
  """One decoder layer; returns (h, cache, the indexer's top-k indices or None).

  Under a sharding plan (``opts.sharding``) the residual stream is pinned to the plan's layout at the
  layer boundary and the MoE runs expert-parallel (the plan's ``moe``); without one, nothing changes.
  """
  h = opts.constrain(h, RESIDUAL_AXES)
  attn_out, cache, topk = attention(p["attn"], cfg, opts, rms_norm(h, p["attn_norm"], cfg.norm_eps), cache, layer,
                                    start, kv_len, cos, sin)
  h = residual_add(h, attn_out)
  x = rms_norm(h, p["ffn_norm"], cfg.norm_eps)
  if not is_moe:
    ffn_out = swiglu(p["ffn"], x, opts.linear_kernels)
  elif opts.sharding is None:
    ffn_out = moe(p["ffn"], cfg, x, impl=opts.kernels, linear_impl=opts.linear_kernels)
  else:
    ffn_out = opts.sharding.moe(p["ffn"], cfg, x, impl=opts.kernels)
  return residual_add(h, ffn_out), cache, topk


def _run_stack(stack: dict, cfg, opts, h, cache, first_layer: int, start, kv_len, cos, sin, is_moe: bool):
  n = jax.tree.leaves(stack)[0].shape[0]

  def body(carry, xs):
    h, cache = carry
    p, layer = xs
    h, cache, topk = block(p, cfg, opts, h, cache, layer, start, kv_len, cos, sin, is_moe)
    return (h, cache), topk

  (h, cache), topk = jax.lax.scan(body, (h, cache), (stack, first_layer + jnp.arange(n, dtype=jnp.int32)))
  return h, cache, topk


def embed(params: Params, tokens: Int[Array, "b s"], dtype) -> Float[Array, "b s d"]:
  return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def forward(params: Params, cfg: ModelConfig, opts: RunOptions, tokens: Int[Array, "b s"], start: Int[Array, "b"],
            cache: cache_lib.LayerCache, kv_len: int | None = None, return_topk: bool = False):
  """Runs S new tokens per sequence at positions start[b] + (0..S-1).

  Returns (final-normed hidden [B,S,D], cache), and with return_topk the indexer's selections
  [n_layers, B, S, index_topk] (-1 = unused slot; None when kv_len <= index_topk). kv_len (static)
  bounds the keys attended to: the cache length by default; S for a prefill from position 0.
  """
  kv_len = cache.max_len if kv_len is None else kv_len
  chex.assert_rank(tokens, 2)
  chex.assert_shape(start, tokens.shape[:1])
  chex.assert_axis_dimension(cache.kv, 0, cfg.n_layers)
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
  cos, sin = rope_angles(cfg, positions)
  h = embed(params, tokens, opts.jnp_dtype)
  topks = []
  if cfg.n_dense_layers:
    h, cache, topk = _run_stack(params["dense_layers"], cfg, opts, h, cache, 0, start, kv_len, cos, sin, False)
    topks.append(topk)
  if cfg.n_moe_layers:
    h, cache, topk = _run_stack(params["moe_layers"], cfg, opts, h, cache, cfg.n_dense_layers, start, kv_len, cos,
                                sin, True)
    topks.append(topk)
  hidden = rms_norm(h, params["norm"], cfg.norm_eps)
  if not return_topk:
    return hidden, cache
  return hidden, cache, (jnp.concatenate(topks) if topks[0] is not None else None)


def logits(params: Params, hidden: Float[Array, "... d"]) -> Float[Array, "... v"]:
  """The output head in float32 (official: head(h.float()) with a float32 weight)."""
  return jnp.einsum("...d,vd->...v", hidden.astype(jnp.float32), params["head"].astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def mtp_forward(params: Params, cfg: ModelConfig, opts: RunOptions, hidden: Float[Array, "b s d"],
                next_tokens: Int[Array, "b s"], start: Int[Array, "b"], cache: cache_lib.LayerCache,
                depth: int = 0, kv_len: int | None = None):
  """Multi-token prediction module `depth`: from the main model's final hidden state at position i and
  the embedding of token i+1, the hidden state that predicts token i+2 (DeepSeek-V3 section 2.2):

    h' = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])      # embedding first, as the weights are laid out
    h' = Block(h');  logits = head(norm(h'))                 # embedding and head shared with the main model

  ``cache`` holds the MTP layers' own latent and indexer keys (layer axis = depth). Returns
  (normed hidden [B,S,D], cache).
  """
  kv_len = cache.max_len if kv_len is None else kv_len
  p = jax.tree.map(lambda a: a[depth], params["mtp"])
  dtype = opts.jnp_dtype
  positions = start[:, None] + jnp.arange(next_tokens.shape[1], dtype=jnp.int32)
  cos, sin = rope_angles(cfg, positions)
  e = rms_norm(embed(params, next_tokens, dtype), p["enorm"], cfg.norm_eps)
  h = rms_norm(hidden.astype(dtype), p["hnorm"], cfg.norm_eps)
  h = linear(p["eh_proj"], jnp.concatenate([e, h], axis=-1))
  h, cache, _ = block(p["block"], cfg, opts, h, cache, jnp.int32(depth), start, kv_len, cos, sin, True)
  return rms_norm(h, p["norm"], cfg.norm_eps), cache
