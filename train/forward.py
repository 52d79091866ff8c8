"""A differentiable full-sequence forward of DeepSeek-V3.2 for training, built from the model's blocks.

``dsv32_jax.model.forward`` is the inference path (a cache, FP8 rounding, chunked queries). Training
needs every position of a sequence at once, gradients, and, per layer, the main attention
probabilities and the indexer's logits. This module composes the same pieces -- ``mla`` (projections,
``naive_attention_probs``), ``indexer`` (through ``train.selector``), ``moe`` (``route``,
``routed_experts``), ``layers`` and ``rope`` -- on the same parameter pytree (``dsv32_jax.params``),
with float parameters (the release's FP8 weights are an inference format). Three modes:

- ``"dense"``: causal attention over every visible key; the indexer is not run (stage 0, and the
  dense baseline of the evaluations);
- ``"warmup"``: dense attention, and the indexer's KL against the head-summed attention over every
  visible key (stage 1: only the indexer is trained);
- ``"sparse"``: attention over the top-k keys S_t the indexer selects, and the KL restricted to S_t
  (stage 2, and the sparse evaluations).

Gradient isolation: the indexer reads ``stop_gradient`` of its inputs (the normed hidden state and
the query latent ``qr``), the KL's target is a constant, and a selection is a set of indices (no
gradient). So the LM loss reaches the main parameters only and the KL the indexer's only
(``tests/test_train.py`` checks it on the gradients).

Per-layer side outputs (``aux``): the indexer KL, the MoE expert loads (for the bias update of
auxiliary-loss-free balancing), and with ``metrics=True`` the selector's recall against the true
top-k of the head-summed attention and the attention mass it captures (``train.metrics``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dsv32_jax import mla, moe
from dsv32_jax.attention import selection_mask
from dsv32_jax.config import ModelConfig
from dsv32_jax.indexer import select_topk
from dsv32_jax.layers import linear, matmul, rms_norm, swiglu
from dsv32_jax.model import embed, logits as head_logits, residual_add
from dsv32_jax.params import Params
from dsv32_jax.rope import rope_angles
from train import losses, selector
from train.selector import IndexerVariant

MODES = ("dense", "warmup", "sparse")
LAYER_METRICS = ("recall", "mass", "kl_dense", "selected", "probe_hit", "probe_attn")


def _selection_metrics(v: IndexerVariant, cfg: ModelConfig, probs, index_logits, causal, selected):
  """Per layer (means over the queries that see more than k keys): recall of S_t against the true top-k
  of the head-summed attention p, the mass of p on S_t, and the keys selected per query."""
  t = causal.shape[-1]
  k = min(v.topk(cfg, t), t)
  target = losses.head_summed_target(probs, causal)
  true_topk = selection_mask(select_topk(jnp.where(causal, target, -jnp.inf), k), t) & causal
  active = causal.sum(-1) > k                                            # [B,S]: selection is not everything
  n = active.sum()  # no query past k keys: nan (the selection is everything)
  mean = lambda x: jnp.where(n > 0, jnp.sum(jnp.where(active, x, 0.0)) / jnp.maximum(n, 1), jnp.nan)  # noqa: E731
  hits = (true_topk & selected).sum(-1) / k
  return {
      "recall": mean(hits),
      "mass": mean(jnp.where(selected, target, 0.0).sum(-1)),
      "kl_dense": mean(losses.kl_per_query(target, index_logits, causal)),
      "selected": mean(selected.sum(-1).astype(jnp.float32)),
  }


def attention_layer(p: dict, cfg: ModelConfig, v: IndexerVariant, mode: str, x: Float[Array, "b s d"], cos, sin,
                    causal: Bool[Array, "b s t"], metrics: bool, probe: tuple | None):
  """One MLA layer over the whole sequence; returns (output [B,S,D], aux dict of per-layer scalars)."""
  b, s, _ = x.shape
  chex.assert_shape(causal, (b, s, s))
  q_nope, q_pe, qr = mla.project_queries(p, cfg, x, cos, sin)
  c, k_pe = mla.project_latent(p, cfg, x, cos, sin, latent_quant=False)
  k_nope, val = mla.expand_keys(p, cfg, c)
  aux = {"kl": jnp.zeros((), jnp.float32)}
  if mode == "dense" and not metrics and probe is None:
    probs = mla.naive_attention_probs(cfg, q_nope, q_pe, k_nope, k_pe, causal)
  else:
    detached_x, detached_qr = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
    index_logits = selector.index_logits(v, p["indexer"], cfg, detached_x, detached_qr, cos, sin, causal)
    selected = selector.select(v, cfg, index_logits, causal)
    allowed = selected if mode == "sparse" else causal
    probs = mla.naive_attention_probs(cfg, q_nope, q_pe, k_nope, k_pe, allowed)
    if mode != "dense":
      aux["kl"] = losses.indexer_kl(probs, index_logits, allowed)
    if metrics:
      if mode == "sparse":
        raise ValueError("metrics compare the selection with the dense attention: use mode 'warmup' or 'dense'")
      aux.update(_selection_metrics(v, cfg, probs, index_logits, causal, selected))
    if probe is not None:  # (query positions [P], key positions [P]): is the key selected / attended?
      q_pos, k_pos = probe
      aux["probe_hit"] = selected[:, q_pos, k_pos].astype(jnp.float32).mean(0)
      target = losses.head_summed_target(probs, allowed)
      aux["probe_attn"] = target[:, q_pos, k_pos].mean(0)
  o = matmul("bsht,bthd->bshd", probs, val, x.dtype)
  return linear(p["wo"], o.reshape(b, s, -1)), aux


def moe_layer(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"]):
  """``moe.moe`` written out from its parts to return the expert loads; grouped matmul: plain JAX
  (``ragged_dot``, differentiable). Returns (output [B,S,D], tokens per expert [E] float32)."""
  shape = x.shape
  flat = x.reshape(-1, shape[-1])
  weights, idx = moe.route(p["gate"], cfg, flat)
  y = moe.routed_experts(p["experts"], cfg, flat, weights, idx, impl="reference")
  if "shared" in p:
    y = y + swiglu(p["shared"], flat).astype(jnp.float32)
  load = jnp.bincount(idx.reshape(-1), length=cfg.n_routed_experts).astype(jnp.float32)
  return y.astype(x.dtype).reshape(shape), load


def _run_stack(stack: dict, cfg, v, mode, h, cos, sin, causal, is_moe: bool, metrics: bool, probe, remat: bool):
  def body(h, p):
    a, aux = attention_layer(p["attn"], cfg, v, mode, rms_norm(h, p["attn_norm"], cfg.norm_eps), cos, sin, causal,
                             metrics, probe)
    h = residual_add(h, a)
    x = rms_norm(h, p["ffn_norm"], cfg.norm_eps)
    if is_moe:
      f, aux["expert_load"] = moe_layer(p["ffn"], cfg, x)
    else:
      f = swiglu(p["ffn"], x)
    return residual_add(h, f), aux

  return jax.lax.scan(jax.checkpoint(body) if remat else body, h, stack)


def forward(params: Params, cfg: ModelConfig, v: IndexerVariant, tokens: Int[Array, "b s"], mode: str,
            dtype=jnp.float32, metrics: bool = False, probe: tuple | None = None, remat: bool = False):
  """(LM logits [B,S,V] float32, aux) for a batch of sequences starting at position 0.

  aux: ``kl`` [n_layers] (zeros in "dense"), ``expert_load`` [n_moe_layers, E], and with ``metrics``
  (modes "dense"/"warmup") ``recall``, ``mass``, ``kl_dense``, ``selected`` [n_layers]; with ``probe``
  = (query positions, key positions) ``probe_hit`` / ``probe_attn`` [n_layers, P].
  """
  if mode not in MODES:
    raise ValueError(f"mode = {mode!r}: expected one of {MODES}")
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  cos, sin = rope_angles(cfg, positions)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
  h = embed(params, tokens, dtype)
  per_layer = []
  loads = None
  if cfg.n_dense_layers:
    h, aux = _run_stack(params["dense_layers"], cfg, v, mode, h, cos, sin, causal, False, metrics, probe, remat)
    per_layer.append(aux)
  if cfg.n_moe_layers:
    h, aux = _run_stack(params["moe_layers"], cfg, v, mode, h, cos, sin, causal, True, metrics, probe, remat)
    loads = aux.pop("expert_load")
    per_layer.append(aux)
  out = {k: jnp.concatenate([a[k] for a in per_layer]) for k in per_layer[0]}
  out["expert_load"] = loads if loads is not None else jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
  return head_logits(params, rms_norm(h, params["norm"], cfg.norm_eps)), out
