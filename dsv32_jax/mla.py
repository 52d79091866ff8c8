"""Multi-head latent attention (MLA): projections and the attention forms (reference, plain JAX).

Official ``MLA`` (``../shared/reference-spec.md`` section 3)::

  qr = q_norm(wq_a(x));  q = wq_b(qr) -> [q_nope 128 | q_pe 64] per head;  q_pe = rope(q_pe)
  kv = wkv_a(x) -> [c 512 | k_pe 64];  c = kv_norm(c);  k_pe = rope(k_pe)   (one key for all heads)
  naive:    k_nope, v = wkv_b(c) per head;  o = softmax(q . [k_nope | k_pe] * scale) v
  absorbed: q_lat = q_nope W_k;  o_lat = softmax((q_lat . c + q_pe . k_pe) * scale) c;  o = o_lat W_v

RoPE is interleaved here. Scores and softmax outputs are rounded to the activation dtype at the points
where the December official code rounds them (bf16 einsums), so a bf16 run tracks it closely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dsv32_jax import quant
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import linear, matmul, rms_norm
from dsv32_jax.rope import apply_rope


def _mm(eq: str, a, b, dtype):
  """An einsum with float32 accumulation, rounded to dtype (a bf16 torch.einsum)."""
  return matmul(eq, a, b, dtype)


def project_queries(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], cos, sin, impl: str = "reference"):
  """(q_nope [B,S,H,nope], q_pe [B,S,H,rope] roped, qr [B,S,q_lora]); qr also feeds the indexer.
  impl: the linears' kernels setting (``layers.linear``)."""
  b, s, _ = x.shape
  qr = rms_norm(linear(p["wq_a"], x, impl=impl), p["q_norm"], cfg.norm_eps)
  q = linear(p["wq_b"], qr, impl=impl).reshape(b, s, cfg.n_heads, cfg.qk_head_dim)
  q_nope, q_pe = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
  return q_nope, apply_rope(q_pe, cos, sin, interleaved=True), qr


def project_latent(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], cos, sin, latent_quant: bool,
                   impl: str = "reference"):
  """(c [B,S,kv_lora], k_pe [B,S,rope]): what the cache holds for each token."""
  kv = linear(p["wkv_a"], x, impl=impl)
  c, k_pe = jnp.split(kv, [cfg.kv_lora_rank], axis=-1)
  c = rms_norm(c, p["kv_norm"], cfg.norm_eps)
  if latent_quant:  # December code: simulate the FP8 latent cache (k_pe stays in bf16)
    c = quant.fake_quant(c)
  k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, interleaved=True)[:, :, 0, :]
  return c, k_pe


def absorbed_weights(p: dict, cfg: ModelConfig, dtype) -> tuple[Float[Array, "h n c"], Float[Array, "h v c"]]:
  """wkv_b split per head into its key part [H, nope, kv_lora] and value part [H, v, kv_lora].

  The official decode dequantises wkv_b to bf16 (no activation quantisation in this form).
  """
  w = p["wkv_b"]["weight"]
  w = quant.dequant_weight(w, p["wkv_b"]["scale"], dtype) if "scale" in p["wkv_b"] else w.astype(dtype)
  w = w.reshape(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
  return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


def _softmax(scores: Float[Array, "... t"], allowed: Bool[Array, "... t"], dtype):
  """softmax over the allowed keys in float32, rounded to dtype. Every query allows at least itself."""
  return jax.nn.softmax(jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf), axis=-1).astype(dtype)


def expand_keys(p: dict, cfg: ModelConfig, c: Float[Array, "b t c"], impl: str = "reference"
                ) -> tuple[Float[Array, "b t h n"], Float[Array, "b t h v"]]:
  """Per-head (k_nope, v) from the latent through wkv_b, for the naive form."""
  b, t, _ = c.shape
  kv = linear(p["wkv_b"], c, impl=impl).reshape(b, t, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
  k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
  return k_nope, v


def mha_queries_keys(q_nope: Float[Array, "b s h n"], q_pe: Float[Array, "b s h r"], k_nope: Float[Array, "b t h n"],
                     k_pe: Float[Array, "b t r"]) -> tuple[Float[Array, "b s h d"], Float[Array, "b t h d"]]:
  """The MHA form's per-head queries [q_nope | q_pe] and keys [k_nope | k_pe] (one rope key for all heads)."""
  q = jnp.concatenate([q_nope, q_pe], axis=-1)
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))], -1)
  return q, k


def naive_attention_probs(cfg: ModelConfig, q_nope, q_pe, k_nope: Float[Array, "b t h n"], k_pe: Float[Array, "b t r"],
                          allowed: Bool[Array, "b s t"]) -> Float[Array, "b s h t"]:
  """The attention probabilities of the MHA form, softmax(q . [k_nope | k_pe] * scale) over the allowed keys.

  Exposed for indexer training (``train/``), whose target is these probabilities summed over heads.
  """
  dtype = q_nope.dtype
  q, k = mha_queries_keys(q_nope, q_pe, k_nope, k_pe)
  scores = (_mm("bshd,bthd->bsht", q, k, dtype) * cfg.softmax_scale).astype(dtype)
  return _softmax(scores, allowed[:, :, None, :], dtype)


def naive_attention(cfg: ModelConfig, q_nope, q_pe, k_nope: Float[Array, "b t h n"], v: Float[Array, "b t h v"],
                    k_pe: Float[Array, "b t r"], allowed: Bool[Array, "b s t"]) -> Float[Array, "b s h v"]:
  """MHA form (official prefill): softmax(q . [k_nope | k_pe] * scale) v with per-head keys and values."""
  probs = naive_attention_probs(cfg, q_nope, q_pe, k_nope, k_pe, allowed)
  return _mm("bsht,bthd->bshd", probs, v, q_nope.dtype)


def fused_naive_attention(cfg: ModelConfig, q_nope, q_pe, k_nope: Float[Array, "b t h n"], v: Float[Array, "b t h v"],
                          k_pe: Float[Array, "b t r"], allowed: Bool[Array, "b s t"] | None, *, is_causal: bool,
                          implementation: str | None = None) -> Float[Array, "b s h v"]:
  """``naive_attention`` through ``jax.nn.dot_product_attention`` (``implementation="cudnn"``: cuDNN's fused
  flash attention on a GPU; None: XLA). v is zero-padded to the q/k head dim (cuDNN takes equal head dims,
  and the padded output columns are sliced off); ``allowed`` becomes the mask (None: every key), and
  ``is_causal`` adds query t <= key t with queries and keys both starting at slot 0, which lets cuDNN skip
  the tiles above the diagonal. No [queries, heads, keys] scores are materialised.
  """
  q, k = mha_queries_keys(q_nope, q_pe, k_nope, k_pe)
  v_padded = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - v.shape[-1])))
  mask = None if allowed is None else allowed[:, None]  # [B, 1, S, T]: one mask for every head
  o = jax.nn.dot_product_attention(q, k, v_padded, mask=mask, scale=cfg.softmax_scale, is_causal=is_causal,
                                   implementation=implementation)
  return o[..., :v.shape[-1]]


def absorb_query(p: dict, cfg: ModelConfig, q_nope: Float[Array, "b s h n"]) -> Float[Array, "b s h c"]:
  w_k, _ = absorbed_weights(p, cfg, q_nope.dtype)
  return _mm("bshn,hnc->bshc", q_nope, w_k, q_nope.dtype)


def latent_output(p: dict, cfg: ModelConfig, o_lat: Float[Array, "b s h c"]) -> Float[Array, "b s h v"]:
  _, w_v = absorbed_weights(p, cfg, o_lat.dtype)
  return _mm("bshc,hvc->bshv", o_lat, w_v, o_lat.dtype)


def absorbed_attention(cfg: ModelConfig, q_lat: Float[Array, "b s h c"], q_pe, c: Float[Array, "b t c"],
                       k_pe: Float[Array, "b t r"], allowed: Bool[Array, "b s t"]) -> Float[Array, "b s h c"]:
  """MQA form over all keys with a mask: softmax((q_lat.c + q_pe.k_pe) * scale) . c, in the latent."""
  dtype = q_lat.dtype
  scores = _mm("bshc,btc->bsht", q_lat, c, dtype) + _mm("bshr,btr->bsht", q_pe, k_pe, dtype)
  probs = _softmax((scores * cfg.softmax_scale).astype(dtype), allowed[:, :, None, :], dtype)
  return _mm("bsht,btc->bshc", probs, c, dtype)


def sparse_attention(cfg: ModelConfig, q_lat: Float[Array, "b s h c"], q_pe, c: Float[Array, "b t c"],
                     k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"]) -> Float[Array, "b s h c"]:
  """MQA form over gathered top-k rows; idx = -1 marks an unused slot."""
  return sparse_attention_scaled(cfg.softmax_scale, q_lat, q_pe, c, k_pe, idx)


def sparse_attention_scaled(scale: float, q_lat: Float[Array, "b s h c"], q_pe, c: Float[Array, "b t c"],
                            k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"],
                            c_scale: Float[Array, "b t cb"] | None = None) -> Float[Array, "b s h c"]:
  """``sparse_attention`` with the score scale given: the reference of the sparse MLA kernels.

  c_scale: c is an e4m3 latent cache with a scale per 128 values; only the selected rows are dequantised.
  """
  dtype = q_lat.dtype
  valid = idx >= 0
  safe = jnp.where(valid, idx, 0)
  gather = jax.vmap(lambda rows, i: rows[i])  # per sequence: [T, F] rows at [S, K] -> [S, K, F]
  c_sel, pe_sel = gather(c, safe), gather(k_pe, safe)
  if c_scale is not None:
    c_sel = quant.act_dequant(c_sel, gather(c_scale, safe), dtype)
  scores = _mm("bshc,bskc->bshk", q_lat, c_sel, dtype) + _mm("bshr,bskr->bshk", q_pe, pe_sel, dtype)
  probs = _softmax((scores * scale).astype(dtype), valid[:, :, None, :], dtype)
  return _mm("bshk,bskc->bshc", probs, c_sel, dtype)
