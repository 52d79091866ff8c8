"""The lightning indexer of DeepSeek Sparse Attention (reference implementation in plain JAX).

Paper eq. (1) and the December 2025 official ``Indexer``::

  q = wq_b(qr) -> [B,S,H_I,D_I];  q = [rope_half(q[..,:r]) | q[..,r:]]
  k = LayerNorm(wk(x)) -> [B,S,D_I];  k = [rope_half(k[..,:r]) | k[..,r:]]
  q, k = hadamard(q), hadamard(k);  (q8, q_s), (k8, k_s) = act_quant(q), act_quant(k)
  w = weights_proj(x in fp32) * H_I**-0.5 * q_s * D_I**-0.5      # q's scale folded into w
  I[t,s] = k_s[s] * sum_h w[t,h] * ReLU(q8[t,h] . k8[s])          # + causal mask
  idx = top_k(I, min(index_topk, len))

``quantize=False`` drops the Hadamard rotation and the FP8 rounding together: the rotation is
orthonormal and applied to both sides, so without quantisation it changes nothing (transformers'
``DeepseekV32`` indexer is this variant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv32_jax import quant
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import layer_norm, linear, matmul
from dsv32_jax.rope import apply_rope


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """Sylvester (natural-order) Hadamard matrix with +-1 entries, as fast_hadamard_transform uses."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def hadamard(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """rotate_activation: (x @ H) * d**-0.5 summed in float32, returned in x's dtype.

  H's +-1 entries are exact in any float dtype, so x . H runs in x's own dtype with float32 sums: for bf16
  x every product is exact, the same numbers as a float32 product, without a full-precision float32 GEMM
  (275 GFLOP for a 128K prefill's indexer queries; with weights_proj's, 9 ms of an H200's 26)."""
  d = x.shape[-1]
  y = matmul("...i,ij->...j", x, jnp.asarray(hadamard_matrix(d), x.dtype), jnp.float32)
  return (y * d ** -0.5).astype(x.dtype)


def _rope_first(x: Float[Array, "b s h d"], cos, sin, rope_dim: int) -> Float[Array, "b s h d"]:
  """The indexer ropes its *first* rope_dim dims, half-split (not interleaved)."""
  return jnp.concatenate([apply_rope(x[..., :rope_dim], cos, sin, interleaved=False), x[..., rope_dim:]], -1)


def indexer_keys(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], cos, sin, quantize: bool,
                 impl: str = "reference"):
  """Keys for the indexer cache: (k [B,S,D_I] e4m3 or x.dtype, k_scale [B,S] float32).
  impl: the linears' kernels setting (``layers.linear``)."""
  k = linear(p["wk"], x, impl=impl)
  k = layer_norm(k, p["k_norm"]["weight"], p["k_norm"]["bias"], cfg.norm_eps)
  k = _rope_first(k[:, :, None, :], cos, sin, cfg.qk_rope_head_dim)[:, :, 0, :]
  if not quantize:
    return k, jnp.ones(k.shape[:-1], jnp.float32)
  k8, k_scale = quant.act_quant(hadamard(k), cfg.index_head_dim)
  return k8, k_scale[..., 0]


def _head_weights(p: dict, x: Float[Array, "b s d"]) -> Float[Array, "b s h"]:
  """weights_proj(x in float32), float32. With bf16 x and a bf16 weight (the release's) every product is
  exact in float32, so a bf16 GEMM with float32 sums computes the same without widening x."""
  if x.dtype == p["weight"].dtype == jnp.bfloat16:
    return matmul("...d,hd->...h", x, p["weight"], jnp.float32)
  return linear(p, x.astype(jnp.float32))


def indexer_queries(p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], qr: Float[Array, "b s q"],
                    cos, sin, quantize: bool, impl: str = "reference"):
  """Queries and head weights: (q [B,S,H_I,D_I] e4m3 or x.dtype, w [B,S,H_I] float32, scales folded in)."""
  b, s, _ = qr.shape
  q = linear(p["wq_b"], qr, impl=impl).reshape(b, s, cfg.index_n_heads, cfg.index_head_dim)
  q = _rope_first(q, cos, sin, cfg.qk_rope_head_dim)
  w = _head_weights(p["weights_proj"], x) * cfg.index_n_heads ** -0.5
  if quantize:
    q, q_scale = quant.act_quant(hadamard(q), cfg.index_head_dim)
    w = w * q_scale[..., 0]
  return q, w * cfg.index_head_dim ** -0.5


def index_logits(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                 k_scale: Float[Array, "b t"], allowed: Float[Array, "b s t"]) -> Float[Array, "b s t"]:
  """I[b,t,s] = k_scale[s] * sum_h w[t,h] * ReLU(q[t,h] . k[s]), float32; -inf where not allowed.

  Reference for the Pallas indexer kernels: it materialises [B,S,H_I,T], so callers chunk queries.
  e4m3 operands are widened to bf16 (exactly) for the product; the sum is float32.
  """
  operand = jnp.bfloat16 if quant.is_fp8(q) else q.dtype
  dots = matmul("bshd,btd->bsht", q.astype(operand), k.astype(operand), jnp.float32)
  logits = matmul("bsht,bsh->bst", jax.nn.relu(dots), w) * k_scale[:, None, :]
  return jnp.where(allowed, logits, -jnp.inf)


def select_topk(logits: Float[Array, "b s t"], k: int) -> Int[Array, "b s k"]:
  """Indices of the k largest logits per row, -1 where fewer than k keys are allowed (-inf logits).

  Ties go to the lower key index (``jax.lax.top_k``'s rule). Order within the row is by score,
  which does not matter: the selection is used as a set.
  """
  values, idx = jax.lax.top_k(logits, k)
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32)
