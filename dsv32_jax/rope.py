"""YaRN rotary embedding, exactly as the official ``precompute_freqs_cis`` and ``apply_rotary_emb``.

Two layouts of the same rotation (``../shared/reference-spec.md`` section 4):
- MLA ropes *interleaved* pairs ``(x[2i], x[2i+1])``;
- the lightning indexer ropes *half-split* pairs ``(x[i], x[i + d/2])`` (DeepSeek's November 2025 fix;
  the September demo roped the indexer interleaved, which cost long-context retrieval).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv32_jax.config import ModelConfig


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
  """(low, high) of the YaRN ramp; 10 and 23 for the released 671B config."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta

  def correction_dim(num_rotations: float) -> float:
    return dim * math.log(cfg.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low = math.floor(correction_dim(cfg.beta_fast))
  high = math.ceil(correction_dim(cfg.beta_slow))
  return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """float32 [qk_rope_head_dim / 2] frequencies, YaRN-blended when max_seq_len > original_seq_len."""
  dim = cfg.qk_rope_head_dim
  freqs = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  freqs = freqs.astype(np.float32)
  if cfg.yarn_active:
    low, high = yarn_correction_range(cfg)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    smooth = np.float32(1) - ramp
    freqs = freqs / np.float32(cfg.rope_factor) * (1 - smooth) + freqs * smooth
  return freqs.astype(np.float32)


def rope_angles(cfg: ModelConfig, positions: Int[Array, "b s"]) -> tuple[Float[Array, "b s r"], Float[Array, "b s r"]]:
  """cos and sin of positions * freqs (float32), r = qk_rope_head_dim / 2."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "b s h d"], cos: Float[Array, "b s r"], sin: Float[Array, "b s r"],
               interleaved: bool) -> Float[Array, "b s h d"]:
  """Rotates pairs of x by the angles (computed in float32, returned in x's dtype); d = 2r."""
  xf = x.astype(jnp.float32)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  if interleaved:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
  else:
    x1, x2 = jnp.split(xf, 2, axis=-1)
  y1 = x1 * c - x2 * s
  y2 = x1 * s + x2 * c
  if interleaved:
    y = jnp.stack([y1, y2], axis=-1).reshape(x.shape)
  else:
    y = jnp.concatenate([y1, y2], axis=-1)
  return y.astype(x.dtype)
