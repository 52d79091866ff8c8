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


class ExpertBlocks(NamedTuple):
  """The block-aligned layout of rows sorted by expert: each expert's rows padded to a multiple of block_m."""

  row_source: Int[Array, "m"]     # the sorted row in each aligned row; n_rows on padding rows
  row_dest: Int[Array, "r"]       # the aligned row of each sorted row; m for rows past the last group
  block_expert: Int[Array, "nb"]  # the expert of each block of block_m rows; -1 past the last used block


def align_to_blocks(group_sizes: Int[Array, "e"], n_rows: int, block_m: int) -> ExpertBlocks:
  """The grouped FP8 GEMM's layout for n_rows rows sorted by expert, inside jit with static shapes.

  Each expert with rows adds at most block_m - 1 padding rows, so the static row count is
  n_rows + min(E, n_rows) * (block_m - 1), rounded up to block_m.
  """
  e = group_sizes.shape[0]
  m = -(-(n_rows + min(e, n_rows) * (block_m - 1)) // block_m) * block_m
  padded = -(-group_sizes // block_m) * block_m
  end, padded_end = jnp.cumsum(group_sizes), jnp.cumsum(padded)
  r = jnp.arange(n_rows)
  expert = jnp.minimum(jnp.searchsorted(end, r, side="right"), e - 1)
  row_dest = jnp.where(r < end[-1], (padded_end - padded)[expert] + r - (end - group_sizes)[expert], m)
  row_source = jnp.full(m, n_rows, jnp.int32).at[row_dest].set(r.astype(jnp.int32), mode="drop")
  block_start = jnp.arange(m // block_m) * block_m
  block_expert = jnp.searchsorted(padded_end, block_start, side="right").astype(jnp.int32)
  return ExpertBlocks(row_source, row_dest.astype(jnp.int32), jnp.where(block_start < padded_end[-1], block_expert, -1))


def _fp8_kernel_backend(p: dict, impl: str) -> str | None:
  fp8 = all("scale" in p[name] for name in ("w1", "w2", "w3"))
  inter, dim = p["w1"]["weight"].shape[-2:]
  return dispatch.fp8_experts_backend(impl, fp8, (dim, inter))


def _swiglu_blocks(p: dict, rows_q: Float[Array, "m d"], rows_s: Float[Array, "m db"], block_expert: Int[Array, "nb"],
                   dtype, interpret: bool) -> Float[Array, "m d"]:
  """Each expert's SwiGLU through the grouped FP8 GEMM: gate and up in one launch, SwiGLU, re-quantise, down.

  Rows of unused blocks come back undefined: callers drop them.
  """
  from pallas_kernels.grouped_gemm_fp8_mgpu import grouped_gemm_fp8
  gemm = functools.partial(grouped_gemm_fp8, block_expert=block_expert, out_dtype=dtype, interpret=interpret)
  gate, up = gemm(rows_q, rows_s, (p["w1"]["weight"], p["w3"]["weight"]), (p["w1"]["scale"], p["w3"]["scale"]))
  hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)
  return gemm(*quant.act_quant(hidden), (p["w2"]["weight"],), (p["w2"]["scale"],))[0]


def _block_m() -> int:
  from pallas_kernels.grouped_gemm_fp8_mgpu import DEFAULT_CONFIG
  return DEFAULT_CONFIG.block_m


def grouped_swiglu(p: dict, rows: Float[Array, "m d"], group_sizes: Int[Array, "e"], impl: str) -> Float[Array, "m d"]:
  """Each expert's SwiGLU on its rows (sorted by expert; zeros past the last group); also what each
  device runs under expert parallelism. FP8 experts on a GPU: the grouped FP8 GEMM, else ragged."""
  backend = _fp8_kernel_backend(p, impl)
  if backend is not None:
    blocks = align_to_blocks(group_sizes, rows.shape[0], _block_m())
    rows_q, rows_s = quant.act_quant(rows)
    take = functools.partial(jnp.take, axis=0, mode="fill", fill_value=0)
    out = _swiglu_blocks(p, take(rows_q, blocks.row_source), take(rows_s, blocks.row_source), blocks.block_expert,
                         rows.dtype, interpret=backend == "interpret")
    return take(out, blocks.row_dest)
  gate = grouped_linear(p["w1"], rows, group_sizes, impl).astype(jnp.float32)
  up = grouped_linear(p["w3"], rows, group_sizes, impl).astype(jnp.float32)
  hidden = (jax.nn.silu(gate) * up).astype(rows.dtype)
  return grouped_linear(p["w2"], hidden, group_sizes, impl)


def routed_experts(p: dict, cfg: ModelConfig, x: Float[Array, "n d"], weights: Float[Array, "n k"],
                   idx: Int[Array, "n k"], impl: str = "auto") -> Float[Array, "n d"]:
  """sum_k weights[:, k] * expert_{idx[:, k]}(x), in float32, as one grouped matmul per projection."""
  n, k = idx.shape
  chex.assert_shape(x, (n, cfg.dim))
  chex.assert_equal_shape([weights, idx])
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)              # (token, slot) pairs sorted by expert
  group_sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
  backend = _fp8_kernel_backend(p, impl)
  if backend is None:
    token = order // k
    out = grouped_swiglu(p, x[token], group_sizes, impl)
    weighted = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(weighted)
  # The grouped FP8 GEMM: quantise each token once (act_quant is per row), gather its copies straight
  # into the block-aligned layout; padding rows point past the last token (zeros in, dropped out).
  blocks = align_to_blocks(group_sizes, n * k, _block_m())
  pair = jnp.take(order, blocks.row_source, mode="fill", fill_value=n * k)
  token = pair // k
  xq, xs = quant.act_quant(x)
  take = functools.partial(jnp.take, axis=0, mode="fill", fill_value=0)
  out = _swiglu_blocks(p, take(xq, token), take(xs, token), blocks.block_expert, x.dtype,
                       interpret=backend == "interpret")
  pair_weight = jnp.take(weights.reshape(-1), pair, mode="fill", fill_value=0)
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out.astype(jnp.float32) * pair_weight[:, None],
                                                                 mode="drop")


def moe(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], impl: str = "auto",
        linear_impl: str | None = None) -> Float[Array, "b s d"]:
  """Routed experts (impl: their grouped GEMM's kernels setting) plus the shared expert (linear_impl: its
  linears', ``RunOptions.linear_kernels``; None: impl)."""
  shape = x.shape
  x = x.reshape(-1, shape[-1])
  weights, idx = route(p["gate"], cfg, x)
  y = routed_experts(p["experts"], cfg, x, weights, idx, impl)
  if "shared" in p:
    y = y + swiglu(p["shared"], x, impl if linear_impl is None else linear_impl).astype(jnp.float32)
  return y.astype(x.dtype).reshape(shape)

