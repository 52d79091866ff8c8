"""YaRN frequencies and the two RoPE layouts (MLA interleaved, indexer half-split)."""

import math

import jax.numpy as jnp
import numpy as np

from dsv32_jax.config import preset
from dsv32_jax.rope import apply_rope, rope_angles, rope_frequencies
from tests.conftest import rel_err


def official_freqs(dim, base, factor, original, beta_fast, beta_slow, max_seq_len):
  """precompute_freqs_cis of the official inference/model.py, transcribed in float64 Python."""
  freqs = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
  if max_seq_len > original:
    def corr(rot):
      return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
      high += 0.001
    for i in range(dim // 2):
      smooth = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
      freqs[i] = freqs[i] / factor * (1 - smooth) + freqs[i] * smooth
  return np.array(freqs)


def test_yarn_frequencies_of_the_671b_config_equal_the_official_formula():
  cfg = preset("v32-671b")
  ours = rope_frequencies(cfg)
  ref = official_freqs(64, 10000.0, 40.0, 4096, 32, 1, 16384)  # the demo's max_seq_len: same table
  assert ours.dtype == np.float32 and ours.shape == (32,)
  np.testing.assert_allclose(ours, ref, rtol=2e-7)
  assert np.allclose(ours[:11], 1.0 / 10000.0 ** (np.arange(0, 22, 2) / 64), rtol=1e-6)   # i <= low: unscaled
  assert np.allclose(ours[23:], 1.0 / 10000.0 ** (np.arange(46, 64, 2) / 64) / 40, rtol=1e-6)  # i >= high: / 40


def test_no_yarn_within_the_original_length():
  cfg = preset("v32-671b").replace(max_seq_len=4096)
  np.testing.assert_allclose(rope_frequencies(cfg), official_freqs(64, 1e4, 40, 4096, 32, 1, 4096), rtol=2e-7)
  assert cfg.softmax_scale == 192 ** -0.5


def test_layouts_are_the_same_rotation_of_permuted_pairs(rng):
  cfg = preset("tiny")
  x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)
  pos = jnp.asarray(rng.integers(0, 4000, (2, 5)))
  cos, sin = rope_angles(cfg, pos)
  inter = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved=True))
  # the half-split layout pairs (i, i+32): de-interleave, rotate half-split, re-interleave
  perm = np.concatenate([np.arange(0, 64, 2), np.arange(1, 64, 2)])
  half = np.asarray(apply_rope(jnp.asarray(x[..., perm]), cos, sin, interleaved=False))
  np.testing.assert_allclose(half[..., np.argsort(perm)], inter, rtol=1e-6, atol=1e-6)
  # and the two layouts differ on the same input (the September demo's indexer bug)
  half_same = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved=False))
  assert rel_err(half_same, inter) > 0.1


def test_rotation_against_complex_multiplication(rng):
  cfg = preset("v32-671b")
  x = rng.standard_normal((1, 7, 2, 64)).astype(np.float32)
  pos = np.arange(7)[None] * 9000
  cos, sin = rope_angles(cfg, jnp.asarray(pos))
  # the official code forms the angles in float32 (torch.outer of float32), then rotates exactly
  angles = (pos[..., None].astype(np.float32) * rope_frequencies(cfg)).astype(np.float64)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[:, :, None, :]
  ref = np.stack([z.real, z.imag], -1).reshape(x.shape)
  assert rel_err(apply_rope(jnp.asarray(x), cos, sin, interleaved=True), ref) < 1e-5
