"""Greedy, temperature and nucleus sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.sampling import SamplingParams, sample, top_p_mask


def test_greedy_is_argmax(rng):
  logits = jnp.asarray(rng.standard_normal((5, 50)), jnp.float32)
  np.testing.assert_array_equal(sample(logits, jax.random.key(0), SamplingParams()), np.argmax(logits, -1))


def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
  kept = np.isfinite(np.asarray(top_p_mask(jnp.log(jnp.asarray(probs)), 0.8)))
  assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
  kept = np.isfinite(np.asarray(top_p_mask(jnp.log(jnp.asarray(probs)), 0.81)))
  assert kept[0].tolist() == [True, False, True, True]


def test_temperature_sampling_follows_the_distribution(rng):
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (20000, 1))
  draws = np.asarray(sample(logits, jax.random.key(int(rng.integers(1 << 30))), SamplingParams(temperature=1.0)))
  freq = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(freq, probs, atol=0.015)
  nucleus = np.asarray(sample(logits, jax.random.key(1), SamplingParams(temperature=1.0, top_p=0.65)))
  assert set(np.unique(nucleus)) == {2, 3}


def test_invalid_sampling_params():
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0)
