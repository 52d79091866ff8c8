"""FP8 e4m3 quantisation exactly as the official ``kernel.py``: ``act_quant`` and block-scaled weights.

Activations: one scale per row and per block of 128 columns, ``s = amax / 448`` rounded *up* to a
power of two (``scale_fmt = "ue8m0"``), ``y = clip(x / s, ±448)`` cast to e4m3 with round-to-nearest-even.
Weights: e4m3 values with a float32 scale per 128x128 block, ``W[i, j] = W8[i, j] * scale_inv[i//128, j//128]``
(the release calls it ``weight_scale_inv`` but multiplies by it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from dsv32_jax.config import FP8_BLOCK

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # act_quant clamps amax below at 1e-4


def ue8m0_scale(amax: Float[Array, "..."]) -> Float[Array, "..."]:
  """2 ** ceil(log2(amax / 448)), computed exactly (the official ``fast_round_scale``)."""
  # kernel.py multiplies by the float32 inverse of 448 before rounding the exponent up.
  r = jnp.maximum(amax, AMAX_FLOOR).astype(jnp.float32) * jnp.float32(1.0 / FP8_MAX)
  mantissa, exponent = jnp.frexp(r)  # r = mantissa * 2**exponent, mantissa in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
  return jnp.ldexp(jnp.ones_like(r), exponent)


def act_quant(x: Float[Array, "... n"], block: int = FP8_BLOCK, ue8m0: bool = True):
  """Quantises the last axis in blocks: returns (e4m3 values [..., n], float32 scales [..., n/block])."""
  n = x.shape[-1]
  if n % block:
    raise ValueError(f"act_quant: last dimension {n} is not a multiple of the block size {block}")
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], n // block, block)
  amax = jnp.max(jnp.abs(xb), axis=-1)
  scale = ue8m0_scale(amax) if ue8m0 else jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  y = jnp.clip(xb / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
  # The barrier keeps the e4m3 rounding: with excess precision allowed (its default), XLA on GPU
  # removes a float32 -> e4m3 -> float32 convert pair, which would skip the quantisation of fake_quant.
  return jax.lax.optimization_barrier(y).reshape(x.shape), scale


def act_dequant(y: Float[Array, "... n"], scale: Float[Array, "... nb"], dtype=jnp.float32):
  """Inverse of act_quant: y * s per block (exact in bf16 and float32 for power-of-two scales)."""
  n = y.shape[-1]
  nb = scale.shape[-1]
  yb = y.astype(jnp.float32).reshape(*y.shape[:-1], nb, n // nb)
  return (yb * scale[..., None]).reshape(y.shape).astype(dtype)


def fake_quant(x: Float[Array, "... n"], block: int = FP8_BLOCK) -> Float[Array, "... n"]:
  """dequant(act_quant(x)) in x's dtype: what the official code does to the MLA latent (Dec 2025)."""
  y, s = act_quant(x, block)
  return act_dequant(y, s, x.dtype)


def dequant_weight(w: Float[Array, "*b out inp"], scale: Float[Array, "*b ob ib"], dtype) -> Float[Array, "*b out inp"]:
  """W8 * scale_inv per 128x128 block; edge blocks may be partial (scale grid is ceil(out/128) x ceil(in/128))."""
  out, inp = w.shape[-2:]
  s = jnp.repeat(jnp.repeat(scale, FP8_BLOCK, axis=-2)[..., :out, :], FP8_BLOCK, axis=-1)[..., :inp]
  return (w.astype(jnp.float32) * s).astype(dtype)


def quantize_weight_np(w: np.ndarray, ue8m0: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Block-quantises a float [out, in] (or [..., out, in]) array like the release: (e4m3 values, f32 scale_inv).

  Used to write checkpoints in the release format; numpy, so it runs tensor by tensor on the host.
  """
  import ml_dtypes
  *lead, out, inp = w.shape
  ob, ib = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
  padded = np.zeros((*lead, ob * FP8_BLOCK, ib * FP8_BLOCK), np.float32)
  padded[..., :out, :inp] = w
  blocks = padded.reshape(*lead, ob, FP8_BLOCK, ib, FP8_BLOCK)
  amax = np.maximum(np.abs(blocks).max(axis=(-3, -1)), AMAX_FLOOR)
  scale = amax / FP8_MAX
  if ue8m0:
    scale = np.exp2(np.ceil(np.log2(scale)))
  scale = scale.astype(np.float32)
  q = np.clip(blocks / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX)
  q = q.reshape(padded.shape)[..., :out, :inp].astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def is_fp8(x: jax.Array | np.ndarray) -> bool:
  return x.dtype == FP8
