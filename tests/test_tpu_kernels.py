"""The DSA Pallas Mosaic TPU kernels in TPU interpret mode (real DMA/semaphore/SMEM semantics on the
CPU, with the race detector) against the plain-JAX references, then through the dispatch and the model.

Shapes are small (interpret mode is slow) but hit the edges: lengths that are not multiples of the
blocks, decode (S = 1), rows with fewer valid keys than k, ties, -1 slots. The 671B shapes are in
tests/test_tpu_lowering.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu

from dsv32_jax import cache as cache_lib
from dsv32_jax import indexer, mla, quant
from dsv32_jax.attention import attention
from dsv32_jax.layers import rms_norm
from dsv32_jax.options import RunOptions
from dsv32_jax.rope import rope_angles
from pallas_kernels import dispatch, index_logits_tpu, sparse_mla_blocks_tpu, sparse_mla_tpu, topk_tpu
from tests.conftest import rel_err

RACES = pltpu.InterpretParams(detect_races=True)


def no_races():
  return interpret_pallas_call.races is not None and not interpret_pallas_call.races.races_found


def index_sets(idx):
  """Each row's selection as a set (order is unspecified); -1 slots dropped, their count kept."""
  idx = np.asarray(idx)
  rows = idx.reshape(-1, idx.shape[-1])
  return [(frozenset(r[r >= 0].tolist()), int((r < 0).sum())) for r in rows]


# --- indexer logits --------------------------------------------------------------------------------

SMALL_INDEX = index_logits_tpu.IndexLogitsTpuConfig(block_q=8, block_k=256, key_chunk=128)


@pytest.mark.parametrize("b, s, t, h, fp8, fp8_matmul, starts", [
    (2, 20, 300, 8, True, False, (280, 0)),     # prefill chunk: S, T not multiples of the blocks
    (3, 1, 700, 16, True, False, (699, 3, 256)),  # decode: one query per sequence, at its own position
    (1, 2, 100, 8, True, True, (60,)),          # MTP-style 2 queries, T < block_k, e4m3 to the MXU
    (2, 16, 512, 8, False, False, (0, 496)),    # unquantised (float32) indexer
])
def test_index_logits_kernel_matches_reference(rng, b, s, t, h, fp8, fp8_matmul, starts):
  q = jnp.asarray(rng.standard_normal((b, s, h, 128)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
  k_scale = jnp.asarray(rng.uniform(0.5, 2.0, (b, t)), jnp.float32)
  if fp8:  # as the cache holds them: e4m3 values, one power-of-two scale per key
    q, _ = quant.act_quant(q)
    k, k_scale = quant.act_quant(k)
    k_scale = k_scale[..., 0]
  positions = jnp.asarray(starts, jnp.int32)[:, None] + jnp.arange(s, dtype=jnp.int32)
  positions = positions.at[0, -1].set(-1)   # a padded query: sees nothing
  visible = jnp.arange(t)[None, None, :] <= positions[:, :, None]
  ref = np.asarray(indexer.index_logits(q, w, k, k_scale, visible))
  config = dataclasses.replace(SMALL_INDEX, fp8_matmul=fp8_matmul)
  out = np.asarray(index_logits_tpu.index_logits(q, w, k, k_scale, positions, config=config, interpret=RACES))
  assert no_races()
  assert out.shape == (b, s, t)
  np.testing.assert_array_equal(np.isneginf(out), ~np.asarray(visible))
  seen = np.asarray(visible)
  assert rel_err(out[seen], ref[seen]) < 1e-6


# --- top-k -----------------------------------------------------------------------------------------


def reference_topk(logits, k):
  """select_topk, with rows shorter than k padded by -inf (lax.top_k needs k <= T)."""
  t = logits.shape[-1]
  padded = np.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, max(0, k - t))], constant_values=-np.inf)
  return indexer.select_topk(jnp.asarray(padded).reshape(1, -1, padded.shape[-1]), k)


def causal_rows(rng, n, t):
  """Random logits, row r seeing a random prefix (the rest -inf), some rows seeing fewer than k."""
  x = rng.standard_normal((n, t)).astype(np.float32)
  seen = rng.integers(1, t + 1, n)
  x[np.arange(t)[None, :] >= seen[:, None]] = -np.inf
  return x


@pytest.mark.parametrize("case", ["causal", "ties", "signed_zeros", "shorter_than_k", "all_masked_row"])
def test_topk_kernel_selects_the_reference_set(rng, case):
  if case == "causal":
    logits, k = causal_rows(rng, 11, 700), 40
  elif case == "ties":       # a coarse grid: many equal values straddle the k-th one
    logits, k = np.round(rng.standard_normal((9, 300)) * 2).astype(np.float32), 37
  elif case == "signed_zeros":  # -0.0 ranks below +0.0, as in jax.lax.top_k
    logits = np.where(rng.random((8, 256)) < 0.5, 0.0, -0.0).astype(np.float32)
    logits[:, :5] = 1.0
    k = 20
  elif case == "shorter_than_k":
    logits, k = rng.standard_normal((3, 50)).astype(np.float32), 64
  else:
    logits, k = rng.standard_normal((8, 200)).astype(np.float32), 16
    logits[2] = -np.inf
  ref = reference_topk(logits, k)
  out = topk_tpu.topk(jnp.asarray(logits), k, interpret=RACES)
  assert no_races()
  assert out.shape == (*logits.shape[:-1], k)
  assert index_sets(out) == index_sets(ref)
  rows = np.asarray(out)
  valid = rows >= 0
  assert (np.diff(np.where(valid, rows, np.iinfo(np.int32).max), axis=-1) >= 0).all()  # ascending, -1 last


def test_topk_lane_overflow_falls_back_to_the_exact_reference(rng):
  """Every 128th key selected: one lane takes more keys than its capacity; the result stays exact."""
  logits = rng.standard_normal((8, 1280)).astype(np.float32)
  logits[:, ::128] += 100.0
  config = topk_tpu.TopkTpuConfig(lane_capacity=4)
  _, lane_counts = topk_tpu.topk_candidates(jnp.asarray(logits), jnp.full((8,), 1280, jnp.int32), 12, config)
  assert int(np.asarray(lane_counts).max()) > 4            # the overflow really happens
  out = topk_tpu.topk(jnp.asarray(logits), 12, config=config, interpret=True)
  assert index_sets(out) == index_sets(reference_topk(logits, 12))


def test_topk_lengths_mask_and_shorten_rows(rng):
  """Row lengths: keys past them are ignored even when finite; blocks stop at their longest row."""
  logits = rng.standard_normal((2, 9, 600)).astype(np.float32)
  lengths = rng.integers(0, 600, (2, 9)).astype(np.int32)
  lengths[0, :8] = rng.integers(0, 200, 8)     # the first block of 8 rows stops after 2 tiles
  masked = np.where(np.arange(600) < lengths[..., None], logits, -np.inf)
  out = topk_tpu.topk(jnp.asarray(logits), 24, jnp.asarray(lengths), interpret=RACES)
  assert no_races()
  assert index_sets(out) == index_sets(reference_topk(masked, 24))
  ref = dispatch.topk(jnp.asarray(logits), 24, jnp.asarray(lengths), impl="reference")
  assert index_sets(ref) == index_sets(out)


def test_default_lane_capacity_covers_random_selections(rng):
  """k = 2048 of 32K random keys: the fullest lane of 2000 rows stays well below the default capacity
  (48; the mean is 16 and a contiguous run puts exactly 16 in every lane)."""
  k, t, trials = 2048, 32768, 2000
  capacity = topk_tpu.DEFAULT_CONFIG.capacity(k)
  worst = max(np.bincount(rng.choice(t, k, replace=False) % 128, minlength=128).max() for _ in range(trials))
  assert capacity == 48 and worst <= capacity - 8, (worst, capacity)


def test_topk_approx_is_exact_off_tpu(rng):
  logits = causal_rows(rng, 6, 400)
  out = topk_tpu.topk_approx(jnp.asarray(logits), 32, recall_target=0.9)
  assert index_sets(out) == index_sets(reference_topk(logits, 32))


# --- sparse MLA ------------------------------------------------------------------------------------


def sparse_inputs(rng, b, s, t, h, k, dtype, clustered=False, invalid=0.2):
  q_lat = jnp.asarray(rng.standard_normal((b, s, h, 128)), dtype)
  q_pe = jnp.asarray(rng.standard_normal((b, s, h, 64)), dtype)
  kv = jnp.asarray(rng.standard_normal((b, t, 128)), dtype)
  k_pe = jnp.asarray(rng.standard_normal((b, t, 64)), dtype)

  def row():  # distinct keys (as top-k's), the last key always among them
    if clustered:  # a run of neighbouring keys: few distinct blocks
      start = rng.integers(0, t - k)
      picked = np.arange(start, start + k - 1)
    else:
      picked = rng.permutation(t - 1)[:k - 1]
    return np.concatenate([[t - 1], rng.permutation(picked)])   # t - 1: its block ends past T if T % 64

  idx = np.stack([np.stack([row() for _ in range(s)]) for _ in range(b)]).astype(np.int32)
  idx[..., 1:][rng.random((b, s, k - 1)) < invalid] = -1
  return q_lat, q_pe, kv, k_pe, jnp.asarray(idx)


def reference_sparse(scale, q_lat, q_pe, kv, k_pe, idx):
  f32 = lambda a: a.astype(jnp.float32)
  return np.asarray(mla.sparse_attention_scaled(scale, f32(q_lat), f32(q_pe), f32(kv), f32(k_pe), idx))


@pytest.mark.parametrize("b, s, t, h, k, dtype, tol", [
    (2, 2, 300, 16, 100, jnp.float32, 1e-5),   # k not a multiple of the chunk; -1 slots
    (1, 2, 1000, 8, 136, jnp.bfloat16, 1e-2),  # two chunks: the double buffer turns over
])
def test_sparse_mla_token_kernel_matches_reference(rng, b, s, t, h, k, dtype, tol):
  args = sparse_inputs(rng, b, s, t, h, k, dtype)
  ref = reference_sparse(0.1, *args)
  out = sparse_mla_tpu.sparse_mla(*args, 0.1, config=sparse_mla_tpu.SparseMlaTpuConfig(chunk=128), interpret=RACES)
  assert no_races()
  assert out.dtype == dtype
  assert rel_err(np.asarray(out.astype(jnp.float32)), ref) < tol


def test_sparse_mla_query_without_selection_is_zero(rng):
  q_lat, q_pe, kv, k_pe, idx = sparse_inputs(rng, 1, 2, 64, 4, 8, jnp.float32)
  idx = idx.at[0, 1].set(-1)
  out = np.asarray(sparse_mla_tpu.sparse_mla(q_lat, q_pe, kv, k_pe, idx, 0.1, interpret=True))
  np.testing.assert_array_equal(out[0, 1], 0.0)
  assert rel_err(out[0, 0], reference_sparse(0.1, q_lat, q_pe, kv, k_pe, idx)[0, 0]) < 1e-5


@pytest.mark.parametrize("t, block_tokens, clustered, dtype, tol", [
    (300, 64, False, jnp.float32, 1e-5),   # scattered keys, T % 64 != 0 (the last block shifted back)
    (1000, 64, True, jnp.float32, 1e-5),   # clustered keys: few blocks
    (1000, 32, False, jnp.bfloat16, 1e-2),
])
def test_sparse_mla_block_kernel_matches_reference(rng, t, block_tokens, clustered, dtype, tol):
  args = sparse_inputs(rng, 2, 2, t, 8, 120, dtype, clustered=clustered)
  ref = reference_sparse(0.1, *args)
  config = sparse_mla_blocks_tpu.SparseMlaBlocksTpuConfig(block_tokens=block_tokens, blocks_per_chunk=2)
  out = sparse_mla_blocks_tpu.sparse_mla_blocks(*args, 0.1, config=config, interpret=RACES)
  assert no_races()
  assert rel_err(np.asarray(out.astype(jnp.float32)), ref) < tol


def test_block_table_lists_each_selected_token_once(rng):
  idx = np.stack([rng.permutation(500)[:60] for _ in range(5)]).astype(np.int32)
  idx[rng.random(idx.shape) < 0.3] = -1
  table, n_blocks = sparse_mla_blocks_tpu.block_table(jnp.asarray(idx), 64)
  table, n_blocks = np.asarray(table), np.asarray(n_blocks)
  k = idx.shape[1]
  for row, tab, n in zip(idx, table, n_blocks):
    blocks, words = tab[:k], tab[k:].view(np.uint32).reshape(k, 2)
    got = {int(blk) * 64 + 32 * wi + bit for blk, w in zip(blocks[:n], words[:n]) for wi in range(2)
           for bit in range(32) if (int(w[wi]) >> bit) & 1}
    assert got == set(row[row >= 0].tolist())
    assert list(blocks[:n]) == sorted(set((row[row >= 0] // 64).tolist()))
    assert not words[n:].any()


# --- dispatch and model ----------------------------------------------------------------------------


def test_dispatch_picks_reference_or_interpreted_tpu_kernels(rng):
  logits = causal_rows(rng, 5, 300)
  ref = dispatch.topk(jnp.asarray(logits), 24, impl="reference")
  assert index_sets(dispatch.topk(jnp.asarray(logits), 24, impl="auto")) == index_sets(ref)   # CPU: reference
  assert index_sets(dispatch.topk(jnp.asarray(logits), 24, impl="pallas")) == index_sets(ref)  # interpreted
  args = sparse_inputs(rng, 1, 1, 64, 4, 8, jnp.float32)
  blocks = sparse_mla_blocks_tpu.SparseMlaBlocksTpuConfig(block_tokens=16)
  ref_o = dispatch.sparse_mla(*args, 0.2, impl="reference")
  assert rel_err(dispatch.sparse_mla(*args, 0.2, impl="pallas", config=blocks), ref_o) < 1e-5
  with pytest.raises(ValueError, match="impl"):
    dispatch.topk(jnp.asarray(logits), 24, impl="triton")
  q8, k8 = jnp.zeros((1, 4, 8, 32), jnp.float8_e4m3fn), jnp.zeros((1, 16, 32), jnp.float8_e4m3fn)
  assert not dispatch.gathered_dsa_runs_kernels(q8, k8, jnp.bfloat16, 512, 64, impl="auto")  # CPU: reference
  assert dispatch.gathered_dsa_runs_kernels(q8, k8, jnp.bfloat16, 512, 64, impl="pallas")    # interpreted TPU
  assert not dispatch.gathered_dsa_runs_kernels(q8, k8, jnp.bfloat16, 512, 64, impl="reference")


@pytest.mark.slow
def test_attention_layer_with_tpu_kernels_equals_reference(tiny_cfg, tiny_params_bf16, rng):
  """One DSA layer, prefill (absorbed + gathered) then a decode step, kernels="pallas" (interpreted
  TPU kernels) against kernels="reference": same selections, same outputs."""
  cfg, b, s, max_len = tiny_cfg, 2, 24, 40          # 24 and 40 > index_topk = 16: the indexer selects
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])
  x = rms_norm(jnp.asarray(rng.standard_normal((b, s + 1, cfg.dim)), jnp.float32), p["attn_norm"], cfg.norm_eps)
  # the reference scores 8 queries a block; the kernels, which hold no per-head scores, 16
  opts = RunOptions(dtype="float32", prefill_attention="absorbed", prefill_selection="gather", query_chunk=8,
                    kernel_query_chunk=16)

  @functools.partial(jax.jit, static_argnames="kernels")
  def run(kernels):
    o = opts.replace(kernels=kernels)
    cache = cache_lib.init_cache(cfg, 1, b, max_len, jnp.float32, True)
    cos, sin = rope_angles(cfg, jnp.broadcast_to(jnp.arange(s), (b, s)))
    prefill, cache, prefill_idx = attention(p["attn"], cfg, o, x[:, :s], cache, jnp.int32(0),
                                            jnp.zeros(b, jnp.int32), s, cos, sin)
    cos, sin = rope_angles(cfg, jnp.full((b, 1), s))
    decode, _, decode_idx = attention(p["attn"], cfg, o, x[:, s:], cache, jnp.int32(0),
                                      jnp.full((b,), s, jnp.int32), max_len, cos, sin)
    return prefill, prefill_idx, decode, decode_idx

  ref, got = run("reference"), run("pallas")
  assert index_sets(got[1]) == index_sets(ref[1]) and index_sets(got[3]) == index_sets(ref[3])
  assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[2], ref[2]) < 1e-5
