"""DeepSeek-V3 mixture of experts: sigmoid group-limited routing with a bias, routed + shared experts.

Official ``Gate`` / ``MoE`` (``../shared/reference-spec.md`` section 6)::

  s = sigmoid(x @ gate.T) (fp32);  sel = s + bias            # the bias only chooses
  group score = sum of the top-2 of sel in each group;  keep the top n_limited_groups groups
  idx = top_k(sel over kept groups, n_activated);  w = s[idx] / sum(s[idx]) * route_scale
  y = sum_i w_i * expert_i(x) + shared(x)                    # accumulated in fp32

Experts run as a grouped matmul over the (token, expert) pairs sorted by expert, so each expert's
weights are read once, with static shapes and no host sync. FP8 experts on a GPU go through the
grouped FP8 GEMM kernel in the block-aligned layout (``align_to_blocks``); elsewhere the ragged
``dispatch.grouped_matmul`` multiplies the dequantised weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax import quant
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import linear_operands, swiglu
from pallas_kernels import dispatch


def route(p_gate: dict, cfg: ModelConfig, x: Float[Array, "n d"]) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
  """(weights [N, K] float32, expert ids [N, K] int32) for each token."""
  n = x.shape[0]
  logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), p_gate["weight"].astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  scores = jax.nn.sigmoid(logits)
  biased = scores + p_gate["bias"].astype(jnp.float32)
  if cfg.n_expert_groups > 1:
    grouped = biased.reshape(n, cfg.n_expert_groups, -1)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    _, keep = jax.lax.top_k(group_scores, cfg.n_limited_groups)
    kept = jnp.zeros((n, cfg.n_expert_groups), bool).at[jnp.arange(n)[:, None], keep].set(True)
    biased = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(n, -1)
  _, idx = jax.lax.top_k(biased, cfg.n_activated_experts)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  weights = weights / weights.sum(axis=-1, keepdims=True) * cfg.route_scale
  return weights, idx.astype(jnp.int32)


def grouped_linear(p: dict, rows: Float[Array, "m i"], group_sizes: Int[Array, "e"], impl: str) -> Float[Array, "m o"]:
  """Per-group linear over rows sorted by group: rows of group g use weight[g] ([E, out, in])."""
  xq, w = linear_operands(p, rows)
  return dispatch.grouped_matmul(xq, w, group_sizes, impl=impl).astype(rows.dtype)


def grouped_swiglu(p: dict, rows: Float[Array, "m d"], group_sizes: Int[Array, "e"], impl: str) -> Float[Array, "m d"]:
  """Each expert's SwiGLU on its rows (sorted by expert); also what each device runs under expert parallelism."""
  gate = grouped_linear(p["w1"], rows, group_sizes, impl).astype(jnp.float32)
  up = grouped_linear(p["w3"], rows, group_sizes, impl).astype(jnp.float32)
  hidden = (jax.nn.silu(gate) * up).astype(rows.dtype)
  return grouped_linear(p["w2"], hidden, group_sizes, impl)


class ExpertBlocks(NamedTuple):
  """(token, slot) pairs sorted by expert, each expert's rows padded to a multiple of block_m."""

  row_pair: Int[Array, "m"]       # the pair (token * k + slot) of each row; n * k on padding rows
  block_expert: Int[Array, "nb"]  # the expert of each block of block_m rows; -1 past the last used block


def align_to_blocks(idx: Int[Array, "n k"], n_experts: int, block_m: int) -> ExpertBlocks:
  """The block-aligned layout of the grouped FP8 GEMM, inside jit with static shapes.

  Rows: n*k pairs plus at most block_m - 1 padding rows for each expert that has any, so the static
  row count is n*k + min(E, n*k) * (block_m - 1), rounded up to block_m.
  """
  pairs = idx.size
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=n_experts)
  padded = -(-sizes // block_m) * block_m
  padded_end = jnp.cumsum(padded)
  expert = flat[order]
  row = (padded_end - padded)[expert] + jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert]
  m = -(-(pairs + min(n_experts, pairs) * (block_m - 1)) // block_m) * block_m
  row_pair = jnp.full(m, pairs, jnp.int32).at[row].set(order.astype(jnp.int32))
  block_start = jnp.arange(m // block_m) * block_m
  block_expert = jnp.searchsorted(padded_end, block_start, side="right").astype(jnp.int32)
  return ExpertBlocks(row_pair, jnp.where(block_start < padded_end[-1], block_expert, -1))


def _routed_experts_fp8_kernel(p: dict, x: Float[Array, "n d"], weights: Float[Array, "n k"], idx: Int[Array, "n k"],
                               n_experts: int, interpret: bool) -> Float[Array, "n d"]:
  """routed_experts through the grouped FP8 GEMM: gate and up in one launch, SwiGLU, down, combine."""
  from pallas_kernels.grouped_gemm_fp8_mgpu import DEFAULT_CONFIG, grouped_gemm_fp8
  n, k = idx.shape
  blocks = align_to_blocks(idx, n_experts, DEFAULT_CONFIG.block_m)
  token = blocks.row_pair // k  # n on padding rows: gathered as zeros, dropped by the scatter
  xq, xs = quant.act_quant(x)   # per token: the same values as quantising each routed copy
  rows_q = jnp.take(xq, token, axis=0, mode="fill", fill_value=0)
  rows_s = jnp.take(xs, token, axis=0, mode="fill", fill_value=0)
  gemm = functools.partial(grouped_gemm_fp8, block_expert=blocks.block_expert, out_dtype=x.dtype, interpret=interpret)
  gate, up = gemm(rows_q, rows_s, (p["w1"]["weight"], p["w3"]["weight"]), (p["w1"]["scale"], p["w3"]["scale"]))
  hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
  out = gemm(*quant.act_quant(hidden), (p["w2"]["weight"],), (p["w2"]["scale"],))[0]
  pair_weight = jnp.take(weights.reshape(-1), blocks.row_pair, mode="fill", fill_value=0)
  # Rows of unused blocks hold whatever the kernel left there: their token is n, so they are dropped.
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out.astype(jnp.float32) * pair_weight[:, None],
                                                                 mode="drop")


def routed_experts(p: dict, cfg: ModelConfig, x: Float[Array, "n d"], weights: Float[Array, "n k"],
                   idx: Int[Array, "n k"], impl: str = "auto") -> Float[Array, "n d"]:
  """sum_k weights[:, k] * expert_{idx[:, k]}(x), in float32, as one grouped matmul per projection."""
  n, k = idx.shape
  chex.assert_shape(x, (n, cfg.dim))
  chex.assert_equal_shape([weights, idx])
  fp8 = all("scale" in p[name] for name in ("w1", "w2", "w3"))
  backend = dispatch.fp8_experts_backend(impl, fp8, (cfg.dim, cfg.moe_inter_dim))
  if backend is not None:
    return _routed_experts_fp8_kernel(p, x, weights, idx, cfg.n_routed_experts, interpret=backend == "interpret")
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)              # (token, slot) pairs sorted by expert
  token = order // k
  group_sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
  out = grouped_swiglu(p, x[token], group_sizes, impl)
  weighted = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(weighted)


def moe(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], impl: str = "auto") -> Float[Array, "b s d"]:
  shape = x.shape
  x = x.reshape(-1, shape[-1])
  weights, idx = route(p["gate"], cfg, x)
  y = routed_experts(p["experts"], cfg, x, weights, idx, impl)
  if "shared" in p:
    y = y + swiglu(p["shared"], x).astype(jnp.float32)
  return y.astype(x.dtype).reshape(shape)

