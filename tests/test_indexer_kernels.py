"""The DSA selection kernels against the references: indexer logits (Mosaic GPU) and exact top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import indexer, quant
from pallas_kernels import dispatch
from pallas_kernels import topk_gpu as topk_gpu_module
from pallas_kernels.indexer_logits_mgpu import (LONG_CONTEXT_CONFIG, SHORT_CONTEXT_CONFIG, IndexerLogitsConfig,
                                                index_logits_mgpu)
from pallas_kernels.topk_gpu import TopkGpuConfig, ordered_key, segment_log2, topk_candidates_kernel, topk_gpu
from tests.conftest import H100_ABSTRACT, rel_err


def indexer_inputs(rng, b, s, t, h=64, d=128):
  q8, _ = quant.act_quant(jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32))
  k8, ks = quant.act_quant(jnp.asarray(rng.standard_normal((b, t, d)) * 3, jnp.float32))
  w = jnp.asarray(rng.standard_normal((b, s, h)) * 0.01, jnp.float32)
  return q8, w, k8, ks[..., 0]


def check_logits(out, q8, w, k8, ks, positions, tolerance=1e-6, visible_only=False):
  """out against the reference; visible_only: only the keys up to each query's position (the kernel may
  leave the rest unwritten)."""
  visible = jnp.arange(k8.shape[1])[None, None, :] <= positions[:, :, None]
  ref = np.asarray(indexer.index_logits(q8, w, k8, ks, visible))
  out = np.asarray(out)
  if visible_only:
    out, ref = out[np.asarray(visible)], ref[np.asarray(visible)]
  np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
  finite = np.isfinite(ref)
  assert rel_err(out[finite], ref[finite]) < tolerance


@pytest.mark.parametrize("b, s, t, config, positions", [
    # a prefill chunk at the end of a context; T and S not multiples of the blocks; several key splits
    (1, 5, 300, IndexerLogitsConfig(block_q=2, block_kv=64, kv_splits=2), [[200, 201, 250, 298, 299]]),
    # decode: one query per sequence, different lengths, one shorter than a key tile
    (3, 1, 256, IndexerLogitsConfig(block_q=1, block_kv=64, kv_splits=3), [[255], [10], [130]]),
    # two queries' heads in one wgmma (N = 128), two products in flight
    (1, 5, 300, IndexerLogitsConfig(block_q=4, block_kv=64, kv_splits=2, queries_per_wgmma=2),
     [[10, 201, 250, 298, 299]]),
    # the long-context default: two queries a wgmma, one product at a time; a decode step falls back to one
    (1, 5, 300, IndexerLogitsConfig(block_q=4, block_kv=128, queries_per_wgmma=2, overlap=False),
     [[200, 201, 250, 298, 299]]),
    (2, 1, 300, IndexerLogitsConfig(block_q=4, block_kv=128, queries_per_wgmma=2, overlap=False), [[299], [40]]),
])
def test_logits_kernel_in_interpret_mode(rng, b, s, t, config, positions):
  q8, w, k8, ks = indexer_inputs(rng, b, s, t)
  positions = jnp.asarray(positions, jnp.int32)
  out = index_logits_mgpu(q8, w, k8, ks, positions, config, interpret=True)
  assert out.shape == (b, s, t) and out.dtype == jnp.float32
  check_logits(out, q8, w, k8, ks, positions)


def test_logits_kernel_can_leave_the_invisible_tiles_unwritten(rng):
  """fill_invisible=False (the model's prefill, whose top-k reads each row up to its position): the visible
  logits are the reference's, and the keys past a position inside a computed tile are still -inf."""
  q8, w, k8, ks = indexer_inputs(rng, 1, 4, 512)
  positions = jnp.asarray([[40, 41, 100, 130]], jnp.int32)
  config = IndexerLogitsConfig(block_q=2, block_kv=64, kv_splits=2)
  out = index_logits_mgpu(q8, w, k8, ks, positions, config, interpret=True, fill_invisible=False)
  check_logits(out, q8, w, k8, ks, positions, visible_only=True)
  out = np.asarray(out)
  assert np.isneginf(out[0, 0, 41:64]).all() and np.isneginf(out[0, 3, 131:192]).all()  # tiles each block computes
  # Past them nothing is written: interpret mode fills unwritten memory with NaN (uninitialized_memory="nan").
  assert np.isnan(out[0, :2, 64:]).all() and np.isnan(out[0, 2:, 192:]).all()


def test_dispatch_passes_skip_invisible_to_the_gpu_kernel(rng, monkeypatch):
  """dispatch.index_logits(skip_invisible=...) reaches the GPU kernel as fill_invisible=not skip_invisible."""
  from pallas_kernels import indexer_logits_mgpu
  seen = []

  def kernel(*args, fill_invisible=True, **kwargs):
    seen.append(fill_invisible)
    return index_logits_mgpu(*args, interpret=True, fill_invisible=fill_invisible, **kwargs)

  monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
  monkeypatch.setattr(indexer_logits_mgpu, "index_logits_mgpu", kernel)
  q8, w, k8, ks = indexer_inputs(rng, 1, 2, 256)
  positions = jnp.asarray([[10, 11]], jnp.int32)
  for skip in (False, True):
    out = dispatch.index_logits(q8, w, k8, ks, positions, impl="pallas", skip_invisible=skip)
    check_logits(out, q8, w, k8, ks, positions, visible_only=skip)
  assert seen == [True, False]


def test_logits_kernel_lowers_for_hopper_at_the_671b_shapes():
  """Mosaic GPU lowering (layouts, wgmma shapes, TMA rules) runs on the CPU: 64 heads x 128, 128K keys."""
  b, s, t = 1, 2048, 131072
  args = (jax.ShapeDtypeStruct((b, s, 64, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((b, s, 64), jnp.float32),
          jax.ShapeDtypeStruct((b, t, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((b, t), jnp.float32),
          jax.ShapeDtypeStruct((b, s), jnp.int32))
  for config in (SHORT_CONTEXT_CONFIG, LONG_CONTEXT_CONFIG):
    text = jax.jit(lambda *a, config=config: index_logits_mgpu(*a, config=config)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_logits_kernel_rejects_unquantised_operands(rng):
  q8, w, k8, ks = indexer_inputs(rng, 1, 2, 64)
  with pytest.raises(TypeError, match="e4m3"):
    index_logits_mgpu(q8.astype(jnp.bfloat16), w, k8, ks, jnp.zeros((1, 2), jnp.int32))


def test_topk_kernel_lowers_for_hopper_at_the_671b_shapes():
  """Pallas's Triton lowering of the top-k kernel for an H100: 2048 prefill rows x 128K keys, k = 2048."""
  rows = jax.ShapeDtypeStruct((2048, 131072), jnp.float32)
  lengths = jax.ShapeDtypeStruct((2048,), jnp.int32)
  for config in (TopkGpuConfig(), TopkGpuConfig(stop_early=False), TopkGpuConfig(search_bits=4)):
    with jax.sharding.use_abstract_mesh(H100_ABSTRACT):
      text = jax.jit(lambda x, n, config=config: topk_gpu(x, 2048, n, config)).trace(rows, lengths).lower(
          lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


def test_ordered_keys_follow_the_float_order():
  x = jnp.asarray([-jnp.inf, -3e38, -1.0, -1e-38, -0.0, 0.0, 1e-38, 1.0, 3e38, jnp.inf], jnp.float32)
  assert (np.diff(np.asarray(ordered_key(x)).astype(np.int64)) > 0).all()


@pytest.mark.parametrize("rows, t, k, ties", [(3, 1024, 16, False), (2, 2048, 16, True), (2, 4096, 64, True),
                                              (1, 640, 16, False), (4, 8192, 16, False)])
def test_topk_kernel_equals_the_reference_in_interpret_mode(rng, rows, t, k, ties):
  """Exact sets (ties to the lower index), -1 for rows with fewer than k finite values, without fallback;
  rows of different visible lengths (so different segment sizes)."""
  x = rng.standard_normal((rows, t)).astype(np.float32)
  if ties:
    x = np.round(x * 2) / 2
  lengths = np.full(rows, t, np.int32)
  lengths[0] = 20                  # a short row (k <= 20)
  lengths[-1] = t - 100            # a causal-looking row
  if rows > 2:
    lengths[1] = 9 * k             # segment 2
  x[np.arange(t)[None, :] >= lengths[:, None]] = -np.inf
  config = TopkGpuConfig(capacity=64 * k, block=256)  # room for heavy ties: this test is about the kernel
  got, overflow = topk_candidates_kernel(jnp.asarray(x), jnp.asarray(lengths), k, config, interpret=True)
  assert not np.asarray(overflow).any()
  ref = np.asarray(indexer.select_topk(jnp.asarray(x), k))
  for g, r in zip(np.asarray(got), ref):
    assert sorted(g.tolist()) == sorted(r.tolist())


def test_threshold_search_stops_early_with_a_threshold_that_serves(rng):
  """The early stop returns a key that at least k keys reach and that meets the stop condition, below
  the exact k-th largest (so it did stop early); without a condition, the exact k-th largest."""
  keys = ordered_key(jnp.asarray(rng.standard_normal(8192), jnp.float32))
  k = 2048
  count = lambda t: jnp.sum((keys >= t).astype(jnp.int32))
  exact = int(topk_gpu_module.kth_largest_key(count, k))
  assert exact == int(jnp.sort(keys)[-k])
  early = int(topk_gpu_module.kth_largest_key(count, k, lambda c: c <= k + k // 8))
  assert early < exact and k <= int(count(early)) <= k + k // 8
  assert int(count(topk_gpu_module.kth_largest_key(count, k, lambda c: c == k))) == k


@pytest.mark.parametrize("search_bits", [2, 4])
def test_topk_threshold_search_by_digits_equals_the_reference(rng, search_bits):
  """Settling 2 or 4 bits of the thresholds a pass (segment maxima, then candidates) gives the same sets: ties,
  a row with fewer than k finite values, rows of several segment sizes, negative and positive values."""
  r, t, k = 3, 4096, 64
  x = np.round(rng.standard_normal((r, t)) * 3) / 2 - 1.0
  lengths = np.array([40, t, 9 * k], np.int32)
  x = np.where(np.arange(t)[None] < lengths[:, None], x, -np.inf).astype(np.float32)
  config = TopkGpuConfig(capacity=64 * k, block=256, search_bits=search_bits)
  got, overflow = topk_candidates_kernel(jnp.asarray(x), jnp.asarray(lengths), k, config, interpret=True)
  assert not np.asarray(overflow).any()
  ref = np.asarray(indexer.select_topk(jnp.asarray(x), k))
  assert all(sorted(g.tolist()) == sorted(w.tolist()) for g, w in zip(np.asarray(got), ref))
  with pytest.raises(ValueError, match="search_bits"):
    TopkGpuConfig(search_bits=3)


@pytest.mark.parametrize("parts", [3, None])
def test_topk_split_rows_equal_the_reference(rng, parts):
  """Few long rows split across programs (decode): the same sets, ties to the lower index, lengths."""
  r, t, k = 2, 3000, 32
  x = np.round(rng.standard_normal((r, t)) * 4) / 4  # many ties, some across part boundaries
  x[0, 900:1100] = 3.0
  lengths = np.array([t, 1900], np.int32)
  x = np.where(np.arange(t)[None] < lengths[:, None], x, -np.inf).astype(np.float32)  # the contract: -inf past lengths
  ref = np.asarray(indexer.select_topk(jnp.asarray(x)[None], k))[0]
  got = np.asarray(topk_gpu(jnp.asarray(x), k, jnp.asarray(lengths), TopkGpuConfig(block=256, row_parts=parts),
                            interpret=True))
  assert all(set(got[i]) == set(ref[i]) for i in range(r))


@pytest.mark.parametrize("t, k, parts, tied", [(1000, 16, 1, False), (30, 16, 1, False), (1000, 16, 2, False),
                                             (1024, 16, 1, True)])
def test_topk_ignores_what_rows_hold_past_their_lengths(rng, t, k, parts, tied):
  """Values past a row's length (NaN, +inf, large: what an unwritten logits buffer may hold) count as -inf on
  every path: the kernel, short rows, rows split into parts, and the fallback when segment maxima tie."""
  lengths = np.array([t // 2, 3, t], np.int32)
  x = (np.zeros((3, t)) if tied else rng.standard_normal((3, t))).astype(np.float32)
  if tied:  # every segment maximum ties at 0 but a few: the candidate buffer overflows (the fallback)
    x[:, rng.choice(t // 4, 5, replace=False)] = 1.0
  visible = np.arange(t)[None] < lengths[:, None]
  ref = np.asarray(indexer.select_topk(jnp.asarray(np.where(visible, x, -np.inf))[None], k))[0]
  x[0, t // 2:] = np.nan
  x[1, 3:] = np.where(np.arange(3, t) % 2, np.inf, 1e30)
  got = np.asarray(topk_gpu(jnp.asarray(x), k, jnp.asarray(lengths), TopkGpuConfig(block=256, row_parts=parts),
                            interpret=True))
  assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]


def test_topk_segment_sizes():
  lengths = jnp.asarray([1, 20, 8 * 16 - 1, 8 * 16, 16 * 16, 4 * 16 * 64, 10 ** 6], jnp.int32)
  assert segment_log2(lengths, 16).tolist() == [0, 0, 0, 1, 2, 6, 6]


def test_topk_falls_back_when_maxima_tie(rng):
  """More than k segment maxima tied at the threshold overflow the candidate buffer: still exact."""
  x = np.zeros((1, 1024), np.float32)
  x[0, rng.choice(1024, 5, replace=False)] = 1.0
  config = TopkGpuConfig(block=256)
  lengths = jnp.asarray([1024], jnp.int32)
  assert np.asarray(topk_candidates_kernel(jnp.asarray(x), lengths, 16, config, interpret=True)[1]).all()
  got = np.asarray(topk_gpu(jnp.asarray(x), 16, config=config, interpret=True))
  assert sorted(got[0].tolist()) == sorted(np.asarray(indexer.select_topk(jnp.asarray(x), 16))[0].tolist())


@pytest.mark.parametrize("fill_invisible", [True, False])
def test_gpu_kernels_match_the_dispatch_reference(rng, fill_invisible):
  """The dispatch's reference path (the model's 'reference' kernels) and the GPU kernels, interpreted; the
  model's prefill leaves the logits past each block's last visible key tile unwritten."""
  q8, w, k8, ks = indexer_inputs(rng, 1, 3, 1024)
  positions = jnp.asarray([[300, 301, 600]], jnp.int32)
  ref = dispatch.index_logits(q8, w, k8, ks, positions, impl="reference", skip_invisible=not fill_invisible)
  check_logits(ref, q8, w, k8, ks, positions)
  kernel = index_logits_mgpu(q8, w, k8, ks, positions, IndexerLogitsConfig(block_q=2, block_kv=128),
                             interpret=True, fill_invisible=fill_invisible)
  check_logits(kernel, q8, w, k8, ks, positions, visible_only=not fill_invisible)
  lengths = positions + 1
  a = np.asarray(topk_gpu(kernel[0], 16, lengths[0], config=TopkGpuConfig(block=256), interpret=True))
  r = np.asarray(dispatch.topk(ref, 16, lengths, impl="reference"))[0]
  assert [sorted(x) for x in a.tolist()] == [sorted(x) for x in r.tolist()]


@pytest.mark.gpu
@pytest.mark.parametrize("s, t", [(256, 4096), (64, 20000)])
@pytest.mark.parametrize("config", [
    SHORT_CONTEXT_CONFIG, LONG_CONTEXT_CONFIG, IndexerLogitsConfig(4, 64, queries_per_wgmma=2)], ids=str)
def test_logits_kernel_on_gpu(rng, s, t, config):
  q8, w, k8, ks = indexer_inputs(rng, 2, s, t)
  positions = jnp.asarray(t - s + np.arange(s)[None, :] - np.array([[0], [t // 3]]), jnp.int32)
  # Hopper's FP8 tensor cores accumulate with fewer bits than float32 (DeepSeek-V3 report, 3.3.2):
  # about 1e-4 relative against the float32 reference (measured 1.3e-4 on an H100).
  check_logits(index_logits_mgpu(q8, w, k8, ks, positions, config), q8, w, k8, ks, positions, tolerance=1e-3)


@pytest.mark.gpu
def test_topk_kernel_on_gpu(rng):
  x = np.round(rng.standard_normal((64, 20480)) * 8).astype(np.float32)  # ties
  x[:8, 3000:] = -np.inf
  got = np.asarray(topk_gpu(jnp.asarray(x), 2048))
  ref = np.asarray(indexer.select_topk(jnp.asarray(x), 2048))
  for g, r in zip(got, ref):
    assert sorted(g.tolist()) == sorted(r.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-weights", "fp8-weights"])
def test_model_with_kernels_is_as_accurate_as_the_reference_on_gpu(rng, fp8):
  """The model's prefill and decode in float32 with the kernels ('auto' on GPU: the indexer logits and
  top-k, and with the release's FP8 experts the grouped FP8 GEMM) against the float32 reference path.

  FP8 tensor cores accumulate in less than float32 (the grouped GEMM is 1.3e-4 from the float32
  reference on an H100), and every FP8 linear re-quantises its input to e4m3 (steps of 6-12%), so such
  differences flip roundings and grow from layer to layer: on an H100 the tiny random model's MoE layer
  alone differs by 3e-3, and the last layer's top-k sets agree on only 37% of rows (logits 6e-2), all
  of it from the experts' accumulation. So equality is asked where nothing precedes it -- the first
  layer's selections -- and after that the kernel path must stay closer to the float32 reference than
  the reference itself run in bfloat16, the default mode (which agrees on 26-64% of the top-k sets and
  moves the logits by 0.11-0.23)."""
  from dsv32_jax import cache as cache_lib
  from dsv32_jax import model
  from dsv32_jax.config import preset
  from dsv32_jax.options import RunOptions
  from dsv32_jax.params import init_params
  cfg = preset("tiny").replace(index_n_heads=16, index_topk=32)
  params = jax.tree.map(jnp.asarray, init_params(cfg, seed=3, fp8=fp8))
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 161)), jnp.int32)

  def run(kernels, dtype="float32"):
    opts = RunOptions(dtype=dtype, kernels=kernels)
    cache = cache_lib.init_cache(cfg, cfg.n_layers, 4, 192, opts.jnp_dtype)
    prefill = jax.jit(lambda p, t, c: model.forward(p, cfg, opts, t, jnp.zeros(4, jnp.int32), c, kv_len=160,
                                                    return_topk=True))
    hidden, cache, topk = prefill(params, tokens[:, :160], cache)
    step = jax.jit(lambda p, t, c: model.forward(p, cfg, opts, t, jnp.full((4,), 160, jnp.int32), c))
    h2, _ = step(params, tokens[:, 160:], cache)
    return np.asarray(model.logits(params, hidden)), np.asarray(model.logits(params, h2)), np.asarray(topk)

  exact, bf16, kernel = run("reference"), run("reference", "bfloat16"), run("auto")

  def agreement(topk):  # per layer: the share of rows whose selected set equals the float32 reference's
    return np.array([np.mean([set(a) == set(b) for a, b in zip(got.reshape(-1, 32), want.reshape(-1, 32))])
                     for got, want in zip(topk, exact[2])])

  kernel_agree, bf16_agree = agreement(kernel[2]), agreement(bf16[2])
  assert kernel_agree[0] > 0.95, f"first layer: top-k sets agree on {kernel_agree[0]:.3f} of rows"
  assert np.all(kernel_agree >= bf16_agree), f"top-k agreement per layer: kernels {kernel_agree}, bf16 {bf16_agree}"
  for phase, want, ref, got in zip(("prefill", "decode"), exact, bf16, kernel):
    ref_err, kernel_err = rel_err(ref, want), rel_err(got, want)
    assert kernel_err <= ref_err, f"{phase} logits: kernels {kernel_err:.2e}, bf16 reference {ref_err:.2e}"


def test_the_sweep_host_reference_orders_like_lax_top_k(rng):
  """benchmarks/topk_gpu_sweep.py checks each tiling against a host reference: the same sets as the
  reference selection, signed zeros (-0.0 < +0.0) and ties to the lower index included."""
  from benchmarks.topk_gpu_sweep import stable_topk_sets
  rows = np.round(rng.standard_normal((16, 600)) * 2).astype(np.float32)  # many ties, both zeros at the boundary
  rows[:, ::7] = -0.0
  rows[:4, 300:] = -np.inf
  want = np.sort(np.asarray(indexer.select_topk(jnp.asarray(rows), 256)), -1)
  assert np.array_equal(stable_topk_sets(rows, 256), want)
