"""The masked-attention Mosaic GPU kernel (DSA's short prefills) against its float32 reference: in Mosaic
GPU interpret mode on the CPU, lowered for Hopper, and compiled on a GPU when there is one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masked_mha_mgpu as mm
from tests.conftest import rel_err


def operands(rng, b, s, t, h, dk, dv):
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
  return f(b, s, h, dk), f(b, t, h, dk), f(b, t, h, dv)


def unpack(words, s, t):
  """pack_mask's inverse: [b, s, t] booleans."""
  w = np.asarray(words).view(np.uint32)  # [b, s_pad / 64, t_pad / 32, 64]
  bits = (w[..., None] >> np.arange(32, dtype=np.uint32)) & 1  # [b, sq, tw, 64, 32]
  b, sq, tw = w.shape[:3]
  return np.transpose(bits, (0, 1, 3, 2, 4)).reshape(b, sq * 64, tw * 32)[:, :s, :t].astype(bool)


def test_pack_mask_round_trips(rng):
  allowed = rng.random((2, 70, 150)) < 0.3
  words = mm.pack_mask(jnp.asarray(allowed), block_kv=64)
  assert words.shape == (2, 2, 6, 64)  # queries padded to 128, keys to 192
  np.testing.assert_array_equal(unpack(words, 70, 150), allowed)


def test_selection_words_take_each_selected_key_once(rng):
  idx = rng.integers(0, 100, (1, 5, 12))
  idx[0, 0, 4:] = -1           # unused slots
  idx[0, 1, :6] = idx[0, 1, 6]  # duplicates
  idx[0, 2, 0] = 100            # out of range: nothing
  want = np.zeros((1, 5, 100), bool)
  for i in range(5):
    want[0, i, [j for j in idx[0, i] if 0 <= j < 100]] = True
  np.testing.assert_array_equal(unpack(mm.selection_words(jnp.asarray(idx, jnp.int32), 100, 64), 5, 100), want)


@pytest.mark.parametrize("b, s, t, h, dk, dv, causal, q_offset, density, config", [
    (1, 200, 300, 2, 128, 64, True, 100, 0.4, mm.MaskedMhaConfig(64, 2)),   # DSA's rest block: offset, bits
    (2, 130, 130, 1, 192, 128, True, 0, None, mm.MaskedMhaConfig(64, 3)),  # plain causal, padded queries
    (1, 100, 200, 2, 64, 64, False, 0, 0.2, mm.MaskedMhaConfig(128, 2)),   # bits only, padded keys
    (1, 70, 150, 1, 64, 128, False, 0, None, mm.MaskedMhaConfig(64, 2)),   # no rule: every key (padding masked)
    (1, 60, 100, 1, 64, 64, True, 40, 0.5, mm.MaskedMhaConfig(64, 3)),     # fewer key tiles than stages
])
def test_kernel_equals_the_reference_in_interpret_mode(rng, b, s, t, h, dk, dv, causal, q_offset, density, config):
  q, k, v = operands(rng, b, s, t, h, dk, dv)
  allowed = None if density is None else jnp.asarray(rng.random((b, s, t)) < density)
  if allowed is not None:
    allowed = allowed.at[0, 3].set(False)  # a query that sees no key: zeros
  words = None if allowed is None else mm.pack_mask(allowed, config.block_kv)
  got = mm.masked_mha_mgpu(q, k, v, words, 0.1, causal=causal, q_offset=q_offset, config=config, interpret=True)
  want = mm.reference(q, k, v, allowed, 0.1, causal=causal, q_offset=q_offset)
  assert got.shape == (b, s, h, dv) and got.dtype == jnp.bfloat16
  assert rel_err(got, want) < 1e-2  # bf16 output
  if allowed is not None:
    np.testing.assert_array_equal(np.asarray(got[0, 3], np.float32), 0.0)


def test_reference_is_softmax_attention_over_the_allowed_keys(rng):
  q, k, v = operands(rng, 1, 3, 5, 1, 64, 64)
  allowed = jnp.asarray([[[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]], bool)
  got = mm.reference(q, k, v, allowed, 0.5, causal=True, q_offset=2)  # causal: query i sees keys <= 2 + i
  qf, kf, vf = (np.asarray(a, np.float64) for a in (q, k, v))
  for i, keys in enumerate([[0, 2], [0, 1, 2, 3], [4]]):
    sc = 0.5 * qf[0, i, 0] @ kf[0, keys, 0].T
    p = np.exp(sc - sc.max())
    np.testing.assert_allclose(np.asarray(got[0, i, 0], np.float64), p @ vf[0, keys, 0] / p.sum(), rtol=2e-2,
                               atol=2e-2)


def test_bad_operands_are_named():
  q = jnp.zeros((1, 128, 2, 192), jnp.bfloat16)
  k = jnp.zeros((1, 256, 2, 192), jnp.bfloat16)
  v = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  with pytest.raises(TypeError, match="bf16"):
    mm.masked_mha_mgpu(q.astype(jnp.float32), k, v, None, 1.0, causal=True)
  with pytest.raises(ValueError, match="mask words"):
    mm.masked_mha_mgpu(q, k, v, jnp.zeros((1, 2, 4, 64), jnp.int32), 1.0, causal=True)
  with pytest.raises(ValueError, match="shared memory"):
    mm.masked_mha_mgpu(q, k, v, None, 1.0, causal=True, config=mm.MaskedMhaConfig(128, 4))
  with pytest.raises(ValueError, match="block_kv"):
    mm.MaskedMhaConfig(block_kv=96)
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    mm.MaskedMhaConfig(max_concurrent_steps=1)


@pytest.mark.parametrize("masked", [True, False])
def test_kernel_lowers_for_hopper_at_the_671b_shapes(masked):
  """DSA's 4K prefill, second half: 2048 queries at offset 2048 over 4096 keys, 128 heads, 192 / 128."""
  q = jax.ShapeDtypeStruct((1, 2048, 128, 192), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4096, 128, 192), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, 4096, 128, 128), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1, 32, 128, 64), jnp.int32)

  def run(q, k, v, w):
    return mm.masked_mha_mgpu(q, k, v, w if masked else None, 0.1, causal=True, q_offset=2048)
  assert "mosaic_gpu" in jax.jit(run).trace(q, k, v, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("config", [mm.DEFAULT_CONFIG, mm.MaskedMhaConfig(64, 3)])
@pytest.mark.parametrize("causal, q_offset, density", [(True, 512, 0.3), (True, 0, None), (False, 0, 0.5)])
def test_kernel_on_gpu(rng, config, causal, q_offset, density):
  b, s, t, h = 2, 640, 1200, 4
  q, k, v = operands(rng, b, s, t, h, 192, 128)
  allowed = None if density is None else jnp.asarray(rng.random((b, s, t)) < density).at[1, 7].set(False)
  words = None if allowed is None else mm.pack_mask(allowed, config.block_kv)
  got = mm.masked_mha_mgpu(q, k, v, words, 192 ** -0.5, causal=causal, q_offset=q_offset, config=config)
  assert rel_err(got, mm.reference(q, k, v, allowed, 192 ** -0.5, causal=causal, q_offset=q_offset)) < 1e-2
