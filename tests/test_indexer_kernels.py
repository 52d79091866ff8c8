"""The DSA selection kernels against the references: indexer logits (Mosaic GPU) and exact top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import indexer, quant
from pallas_kernels import dispatch
from pallas_kernels.indexer_logits_mgpu import IndexerLogitsConfig, index_logits_mgpu
from pallas_kernels.topk import TopkConfig, topk_pruned
from tests.conftest import rel_err


def indexer_inputs(rng, b, s, t, h=64, d=128):
  q8, _ = quant.act_quant(jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32))
  k8, ks = quant.act_quant(jnp.asarray(rng.standard_normal((b, t, d)) * 3, jnp.float32))
  w = jnp.asarray(rng.standard_normal((b, s, h)) * 0.01, jnp.float32)
  return q8, w, k8, ks[..., 0]


def check_logits(out, q8, w, k8, ks, positions):
  visible = jnp.arange(k8.shape[1])[None, None, :] <= positions[:, :, None]
  ref = np.asarray(indexer.index_logits(q8, w, k8, ks, visible))
  out = np.asarray(out)
  np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
  finite = np.isfinite(ref)
  assert rel_err(out[finite], ref[finite]) < 1e-6


@pytest.mark.parametrize("b, s, t, config, positions", [
    # a prefill chunk at the end of a context; T and S not multiples of the blocks; several key splits
    (1, 5, 300, IndexerLogitsConfig(block_q=2, block_kv=64, kv_splits=2), [[200, 201, 250, 298, 299]]),
    # decode: one query per sequence, different lengths, one shorter than a key tile
    (3, 1, 256, IndexerLogitsConfig(block_q=1, block_kv=64, kv_splits=3), [[255], [10], [130]]),
])
def test_logits_kernel_in_interpret_mode(rng, b, s, t, config, positions):
  q8, w, k8, ks = indexer_inputs(rng, b, s, t)
  positions = jnp.asarray(positions, jnp.int32)
  out = index_logits_mgpu(q8, w, k8, ks, positions, config, interpret=True)
  assert out.shape == (b, s, t) and out.dtype == jnp.float32
  check_logits(out, q8, w, k8, ks, positions)


def test_logits_kernel_lowers_for_hopper_at_the_671b_shapes():
  """Mosaic GPU lowering (layouts, wgmma shapes, TMA rules) runs on the CPU: 64 heads x 128, 128K keys."""
  b, s, t = 1, 2048, 131072
  args = (jax.ShapeDtypeStruct((b, s, 64, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((b, s, 64), jnp.float32),
          jax.ShapeDtypeStruct((b, t, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((b, t), jnp.float32),
          jax.ShapeDtypeStruct((b, s), jnp.int32))
  text = jax.jit(index_logits_mgpu).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_logits_kernel_rejects_unquantised_operands(rng):
  q8, w, k8, ks = indexer_inputs(rng, 1, 2, 64)
  with pytest.raises(TypeError, match="e4m3"):
    index_logits_mgpu(q8.astype(jnp.bfloat16), w, k8, ks, jnp.zeros((1, 2), jnp.int32))


def ties_and_gaps(rng, shape):
  x = np.round(rng.standard_normal(shape) * 3).astype(np.float32)  # many exact ties
  x[..., -37:] = -np.inf                                           # masked keys
  return x


@pytest.mark.parametrize("shape, k, segment", [((3, 4, 1000), 16, 4), ((2, 5000), 64, 8), ((2, 70), 64, 8),
                                               ((1, 3000), 100, 16)])
def test_pruned_topk_equals_the_reference(rng, shape, k, segment):
  x = ties_and_gaps(rng, shape)
  x[0, ..., 5:] = -np.inf  # a row with fewer than k finite values
  got = np.asarray(topk_pruned(jnp.asarray(x), k, TopkConfig(segment))).reshape(-1, k)
  ref = np.asarray(indexer.select_topk(jnp.asarray(x), k)).reshape(-1, k)
  for g, r in zip(got, ref):
    assert sorted(g.tolist()) == sorted(r.tolist())


def test_dispatch_reference_and_forced_kernel_agree(rng):
  q8, w, k8, ks = indexer_inputs(rng, 1, 3, 130)
  positions = jnp.asarray([[60, 61, 129]], jnp.int32)
  ref = dispatch.index_logits(q8, w, k8, ks, positions, impl="reference")
  check_logits(ref, q8, w, k8, ks, positions)
  forced = dispatch.index_logits(q8, w, k8, ks, positions, impl="pallas")  # interpret mode off GPU
  check_logits(forced, q8, w, k8, ks, positions)
  a = np.asarray(dispatch.topk(forced, 16, impl="pallas"))
  r = np.asarray(dispatch.topk(ref, 16, impl="reference"))
  assert [sorted(x) for x in a.reshape(-1, 16).tolist()] == [sorted(x) for x in r.reshape(-1, 16).tolist()]


@pytest.mark.gpu
@pytest.mark.parametrize("s, t", [(256, 4096), (64, 20000)])
def test_logits_kernel_on_gpu(rng, s, t):
  q8, w, k8, ks = indexer_inputs(rng, 2, s, t)
  positions = jnp.asarray(t - s + np.arange(s)[None, :] - np.array([[0], [t // 3]]), jnp.int32)
  check_logits(index_logits_mgpu(q8, w, k8, ks, positions), q8, w, k8, ks, positions)
