"""FP8 e4m3 quantisation against the official kernel.py formulas."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv32_jax import quant
from tests.conftest import rel_err


def official_act_quant(x, block=128):
  """act_quant_kernel with scale_fmt='ue8m0', transcribed per block in numpy/math."""
  rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
  y = np.empty_like(rows)
  s = np.empty((rows.shape[0], rows.shape[1] // block), np.float32)
  for r in range(rows.shape[0]):
    for j in range(s.shape[1]):
      blk = rows[r, j * block:(j + 1) * block]
      amax = max(float(np.abs(blk).max()), 1e-4)
      scale = 2.0 ** math.ceil(math.log2(np.float32(amax) * np.float32(1 / 448)))
      s[r, j] = scale
      y[r, j * block:(j + 1) * block] = np.clip(blk / scale, -448, 448)
  y8 = y.astype(ml_dtypes.float8_e4m3fn)
  return y8.reshape(x.shape), s.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("magnitude", [1e-6, 1e-2, 1.0, 300.0, 1e5])
def test_act_quant_matches_the_official_formula(rng, magnitude):
  x = (rng.standard_normal((3, 5, 256)) * magnitude).astype(np.float32)
  x[0, 0, :128] *= 50  # one block with an outlier scale
  y, s = quant.act_quant(jnp.asarray(x))
  y_ref, s_ref = official_act_quant(x)
  np.testing.assert_array_equal(np.asarray(s), s_ref)
  np.testing.assert_array_equal(np.asarray(y).astype(np.float32), y_ref.astype(np.float32))
  assert np.all(np.log2(s_ref) == np.round(np.log2(s_ref)))  # ue8m0: powers of two


def test_act_quant_error_and_idempotence(rng):
  x = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
  fq = quant.fake_quant(x)
  assert 0.005 < rel_err(fq, x) < 0.06          # e4m3: 3 mantissa bits
  np.testing.assert_array_equal(quant.fake_quant(fq), fq)  # re-quantising is exact
  xb = x.astype(jnp.bfloat16)  # the same values in bf16 quantise to the same, exactly representable, result
  np.testing.assert_array_equal(quant.fake_quant(xb).astype(jnp.float32), quant.fake_quant(xb.astype(jnp.float32)))


def test_act_quant_rejects_ragged_rows():
  with pytest.raises(ValueError, match="multiple of the block size 128"):
    quant.act_quant(jnp.ones((2, 200)))


def test_weight_block_quantisation_with_partial_blocks(rng):
  w = rng.standard_normal((576, 300)).astype(np.float32) * 0.05  # wkv_a-like: 4.5 x 2.3 blocks
  q, s = quant.quantize_weight_np(w)
  assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (5, 3) and s.dtype == np.float32
  deq = np.asarray(quant.dequant_weight(jnp.asarray(q), jnp.asarray(s), jnp.float32))
  assert rel_err(deq, w) < 0.04
  for i, j in [(0, 0), (4, 2), (2, 1)]:  # W = W8 * scale_inv[i // 128, j // 128]
    blk = np.s_[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
    np.testing.assert_array_equal(deq[blk], q[blk].astype(np.float32) * s[i, j])
  np.testing.assert_array_equal(np.asarray(quant.dequant_weight(jnp.asarray(q), jnp.asarray(s), jnp.bfloat16)
                                           ).astype(np.float32), deq)  # exact in bf16 with ue8m0 scales


@pytest.mark.gpu
def test_fake_quant_rounds_to_e4m3_under_jit_on_gpu(rng):
  """XLA on GPU may drop a float32 -> e4m3 -> float32 round trip (excess precision); ours must not."""
  x = rng.standard_normal((64, 512)).astype(np.float32)
  y, s = official_act_quant(x)
  expected = (y.astype(np.float32).reshape(64, 4, 128) * s[..., None]).reshape(64, 512)
  got = np.asarray(jax.jit(quant.fake_quant)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, expected)
