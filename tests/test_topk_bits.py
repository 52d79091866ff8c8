"""The top-k-as-bits kernel (``pallas_kernels.topk_bits_gpu``) against the indices of ``select_topk`` packed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import indexer
from pallas_kernels import dispatch
from pallas_kernels import masked_mha_mgpu as mm
from pallas_kernels.topk_bits_gpu import TopkBitsConfig, reference, topk_bits_gpu
from tests.conftest import H100_ABSTRACT


def unpack_bits(words: np.ndarray, t: int) -> np.ndarray:
  """pack_bits' inverse: [..., tw] int32 -> [..., t] booleans."""
  bits = (np.asarray(words).view(np.uint32)[..., None] >> np.arange(32, dtype=np.uint32)) & 1
  return bits.reshape(*words.shape[:-1], -1)[..., :t].astype(bool)


def random_rows(rng, rows: int, t: int, ties: bool) -> np.ndarray:
  x = rng.standard_normal((rows, t)).astype(np.float32)
  return np.round(x * 2) / 2 if ties else x  # ties: ~14 distinct values, heavy ties at every threshold


@pytest.mark.parametrize("rows, t, k, ties, block", [
    (3, 300, 16, False, 4096),   # t not a multiple of 32
    (4, 1000, 64, True, 1024),   # ties at the boundary
    (2, 96, 200, False, 4096),   # k > t: every finite value
    (3, 4096, 2048, True, 4096), # the 4K prefill's rows and k
    (5, 2500, 700, False, 4096),
])
def test_kernel_equals_the_reference_in_interpret_mode(rng, rows, t, k, ties, block):
  """The same sets as select_topk (ties to the lower index); rows shorter than their buffer (values past the
  length are garbage, not -inf), a row shorter than k, a -inf inside a row (never chosen). Blocks wider than
  the rows (padding)."""
  x = random_rows(rng, rows, t, ties)
  lengths = rng.integers(t // 2, t + 1, rows).astype(np.int32)
  lengths[0] = min(t, 20)
  x[1, 5] = -np.inf
  x[np.arange(t)[None, :] >= lengths[:, None]] = 1e30  # past the lengths: must be ignored
  got = np.asarray(topk_bits_gpu(jnp.asarray(x), k, jnp.asarray(lengths), TopkBitsConfig(block=block), interpret=True))
  want = np.asarray(reference(jnp.asarray(x), k, jnp.asarray(lengths)))
  assert got.shape == want.shape == (rows, -(-t // 32))
  np.testing.assert_array_equal(got, want)
  chosen = unpack_bits(got, t)
  assert (chosen.sum(1) == np.minimum(k, lengths - (np.arange(rows) == 1) * (lengths > 5))).all()
  assert not chosen[np.arange(t)[None, :] >= lengths[:, None]].any()


def test_reference_packs_the_selected_indices(rng):
  x = jnp.asarray(random_rows(rng, 3, 200, False))
  idx = np.asarray(indexer.select_topk(x[None], 50)[0])
  want = np.zeros((3, 200), bool)
  np.put_along_axis(want, idx, True, axis=1)
  np.testing.assert_array_equal(unpack_bits(reference(x, 50), 200), want)


def test_bits_in_the_kernel_layout_equal_pack_mask(rng):
  """mask_words(pack_bits rows) is pack_mask: the masked-attention kernel reads the kernel's rows directly."""
  allowed = rng.random((2, 130, 200)) < 0.3
  np.testing.assert_array_equal(mm.mask_words(mm.pack_bits(jnp.asarray(allowed)), 200, 64),
                                mm.pack_mask(jnp.asarray(allowed), 64))
  # rows wider than the keys the kernel takes: the bits past them are cleared
  np.testing.assert_array_equal(mm.mask_words(mm.pack_bits(jnp.asarray(allowed)), 100, 64),
                                mm.pack_mask(jnp.asarray(allowed[:, :, :100]), 64))


def test_dispatch_off_the_gpu_packs_the_top_k_indices(rng):
  x = jnp.asarray(random_rows(rng, 6, 300, True)).reshape(2, 3, 300)
  lengths = jnp.asarray([[300, 150, 40], [299, 7, 64]], jnp.int32)
  got = dispatch.topk_bits(x, 32, lengths, impl="reference")
  want = reference(x.reshape(6, 300), 32, lengths.reshape(6)).reshape(2, 3, -1)
  np.testing.assert_array_equal(got, want)


def test_kernel_lowers_for_hopper_at_the_671b_shapes():
  """Pallas's Triton lowering for an H100: a 4K prefill's 2048 scored rows, k = 2048 (and rows of 3000)."""
  for t in (4096, 3000):
    rows = jax.ShapeDtypeStruct((2048, t), jnp.float32)
    lengths = jax.ShapeDtypeStruct((2048,), jnp.int32)
    with jax.sharding.use_abstract_mesh(H100_ABSTRACT):
      text = jax.jit(lambda x, n: topk_bits_gpu(x, 2048, n)).trace(rows, lengths).lower(
          lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


def test_bad_config_and_long_rows_are_named():
  with pytest.raises(ValueError, match="TopkBitsConfig.block"):
    TopkBitsConfig(block=48)
  with pytest.raises(ValueError, match="rows of 5000 values"):
    topk_bits_gpu(jnp.zeros((2, 5000)), 16, interpret=True)


def test_dispatch_packs_the_top_k_indices_for_rows_longer_than_a_block(rng, monkeypatch):
  """Rows past TopkBitsConfig.block take the top-k's indices packed, even where the kernel would run."""
  monkeypatch.setattr(dispatch, "_dsa_backend", lambda *a, **k: "gpu")
  monkeypatch.setattr(dispatch, "topk", lambda x, k, n, impl: indexer.select_topk(  # the GPU top-k's stand-in
      jnp.where(jnp.arange(x.shape[-1]) < n[..., None], x, -jnp.inf)[None], k)[0])
  x = jnp.asarray(random_rows(rng, 2, 600, True))
  lengths = jnp.asarray([600, 300], jnp.int32)
  got = dispatch.topk_bits(x, 64, lengths, config=TopkBitsConfig(block=512))
  np.testing.assert_array_equal(got, reference(x, 64, lengths))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [4096, 4000, 20480])
def test_kernel_on_gpu(rng, t):
  """The kernel for rows of one block (4096, 4000), the dispatch's indices path beyond (20480)."""
  x = np.round(rng.standard_normal((256, t)) * 8).astype(np.float32)  # ties
  lengths = rng.integers(2049, t + 1, 256).astype(np.int32)
  lengths[:8] = 1000  # fewer visible keys than k
  got = np.asarray(dispatch.topk_bits(jnp.asarray(x), 2048, jnp.asarray(lengths), impl="pallas"))
  np.testing.assert_array_equal(got, np.asarray(reference(jnp.asarray(x), 2048, jnp.asarray(lengths))))
