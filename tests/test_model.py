"""Whole-model consistency: decode = prefill, absorbed = naive MLA, selection forms, chunking, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import cache as cache_lib
from dsv32_jax import model
from dsv32_jax.attention import attention
from dsv32_jax.generate import GenerationError, generate
from dsv32_jax.layers import rms_norm
from dsv32_jax.options import EXACT_F32, RunOptions
from dsv32_jax.rope import rope_angles
from tests.conftest import rel_err

F32_FP8 = RunOptions(dtype="float32")  # the release's FP8 simulations, in float32


def prefill_logits(params, cfg, opts, tokens, cache_len=None):
  b, s = tokens.shape
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, cache_len or s, opts.jnp_dtype, opts.indexer_quant,
                               opts.fp8_latent_cache)
  fn = jax.jit(lambda p, t, c: model.forward(p, cfg, opts, t, jnp.zeros(b, jnp.int32), c, kv_len=s))
  hidden, cache = fn(params, tokens, cache)
  return model.logits(params, hidden), cache


def decode_logits(params, cfg, opts, tokens, cache_len):
  b, s = tokens.shape
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, cache_len, opts.jnp_dtype, opts.indexer_quant,
                               opts.fp8_latent_cache)
  step = jax.jit(lambda p, t, pos, c: model.forward(p, cfg, opts, t, pos, c))
  out = []
  for i in range(s):
    hidden, cache = step(params, tokens[:, i:i + 1], jnp.full((b,), i, jnp.int32), cache)
    out.append(model.logits(params, hidden))
  return jnp.concatenate(out, axis=1)


def tokens_for(cfg, rng, b, s):
  return jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s)), jnp.int32)


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_fp8_latent_cache_gives_the_same_logits(tiny_cfg, tiny_params_fp8, rng, form):
  """The e4m3 latent cache (656 bytes a token) holds exactly the values of the bf16 cache with the
  release's latent rounding: prefill and decode logits are bit-identical, in bf16."""
  tokens = tokens_for(tiny_cfg, rng, 2, 40)  # 40 > index_topk: the indexer selects
  opts = RunOptions(prefill_attention=form, prefill_selection="mask" if form == "naive" else "gather")
  fp8 = opts.replace(fp8_latent_cache=True)
  want, want_cache = prefill_logits(tiny_params_fp8, tiny_cfg, opts, tokens)
  got, got_cache = prefill_logits(tiny_params_fp8, tiny_cfg, fp8, tokens)
  assert got_cache.kv.dtype == jnp.float8_e4m3fn and got_cache.kv_scale.shape[-1] == tiny_cfg.kv_lora_rank // 128
  np.testing.assert_array_equal(np.asarray(cache_lib.latent(got_cache, jnp.bfloat16)), np.asarray(want_cache.kv))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(decode_logits(tiny_params_fp8, tiny_cfg, fp8, tokens[:, :20], 24)),
                                np.asarray(decode_logits(tiny_params_fp8, tiny_cfg, opts, tokens[:, :20], 24)))
  with pytest.raises(ValueError, match="latent_quant"):
    RunOptions(latent_quant=False, fp8_latent_cache=True)


@pytest.mark.parametrize("weights, opts", [("bf16", EXACT_F32), ("fp8", F32_FP8)])
def test_decode_step_by_step_equals_prefill(tiny_cfg, tiny_params_bf16, tiny_params_fp8, rng, weights, opts):
  params = tiny_params_fp8 if weights == "fp8" else tiny_params_bf16
  tokens = tokens_for(tiny_cfg, rng, 2, 40)  # 40 > index_topk = 16: the indexer selects
  ref, _ = prefill_logits(params, tiny_cfg, opts, tokens)
  dec = decode_logits(params, tiny_cfg, opts, tokens, cache_len=64)
  assert rel_err(dec, ref) < 1e-5


def test_bf16_decode_equals_bf16_prefill_in_the_same_form(tiny_cfg, tiny_params_fp8, rng):
  """Released precision (bf16 + FP8): decode runs absorbed + gathered; so can prefill."""
  opts = RunOptions(prefill_attention="absorbed", prefill_selection="gather")
  tokens = tokens_for(tiny_cfg, rng, 2, 24)
  ref, _ = prefill_logits(tiny_params_fp8, tiny_cfg, opts, tokens)
  dec = decode_logits(tiny_params_fp8, tiny_cfg, opts, tokens, cache_len=32)
  assert rel_err(dec, ref) < 1e-2


def test_bf16_tracks_float32(tiny_cfg, tiny_params_bf16, rng):
  tokens = tokens_for(tiny_cfg, rng, 2, 40)
  f32, _ = prefill_logits(tiny_params_bf16, tiny_cfg, EXACT_F32, tokens)
  bf16, _ = prefill_logits(tiny_params_bf16, tiny_cfg, EXACT_F32.replace(dtype="bfloat16"), tokens)
  assert rel_err(bf16, f32) < 0.1


@pytest.mark.parametrize("variant", [
    dict(prefill_attention="absorbed"),
    dict(prefill_attention="absorbed", prefill_selection="gather"),
    dict(query_chunk=7),
    dict(prefill_attention="absorbed", prefill_selection="gather", query_chunk=16),
])
def test_attention_forms_agree(tiny_cfg, tiny_params_bf16, rng, variant):
  """Absorbed (latent) MLA = naive MLA; gathered top-k rows = masked scores; query blocks = one block."""
  tokens = tokens_for(tiny_cfg, rng, 2, 40)
  ref, _ = prefill_logits(tiny_params_bf16, tiny_cfg, EXACT_F32, tokens)
  out, _ = prefill_logits(tiny_params_bf16, tiny_cfg, EXACT_F32.replace(**variant), tokens)
  assert rel_err(out, ref) < 1e-5


def test_absorbed_equals_naive_with_fp8_weights(tiny_cfg, tiny_params_fp8, rng):
  tokens = tokens_for(tiny_cfg, rng, 1, 33)
  ref, _ = prefill_logits(tiny_params_fp8, tiny_cfg, F32_FP8, tokens)
  out, _ = prefill_logits(tiny_params_fp8, tiny_cfg, F32_FP8.replace(prefill_attention="absorbed"), tokens)
  assert rel_err(out, ref) < 1e-5


def test_chunked_prefill_equals_one_prefill(tiny_cfg, tiny_params_fp8, rng):
  """A prefill continued from position 20 (keys from the cache) = prefilling all 44 tokens at once."""
  tokens = tokens_for(tiny_cfg, rng, 2, 44)
  ref, _ = prefill_logits(tiny_params_fp8, tiny_cfg, F32_FP8, tokens)
  cache = cache_lib.init_cache(tiny_cfg, tiny_cfg.n_layers, 2, 64, jnp.float32)
  step = jax.jit(lambda p, t, s, c: model.forward(p, tiny_cfg, F32_FP8, t, s, c))
  h1, cache = step(tiny_params_fp8, tokens[:, :20], jnp.zeros(2, jnp.int32), cache)
  h2, cache = step(tiny_params_fp8, tokens[:, 20:], jnp.full((2,), 20, jnp.int32), cache)
  out = model.logits(tiny_params_fp8, jnp.concatenate([h1, h2], axis=1))
  assert rel_err(out, ref) < 1e-5


def test_dsa_equals_dense_causal_attention_within_index_topk(tiny_cfg, tiny_params_bf16, rng):
  """Rows with at most index_topk visible keys select all of them: identical to dense causal attention,
  even when the selection machinery runs (kv_len > index_topk)."""
  s, k = 40, tiny_cfg.index_topk
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])
  x = jnp.asarray(rng.standard_normal((2, s, tiny_cfg.dim)), jnp.float32)
  x = rms_norm(x, p["attn_norm"], tiny_cfg.norm_eps)
  cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(s), (2, s)))
  start = jnp.zeros(2, jnp.int32)

  def run(cfg, opts=EXACT_F32):
    cache = cache_lib.init_cache(cfg, 1, 2, s, jnp.float32, False)
    return attention(p["attn"], cfg, opts, x, cache, jnp.int32(0), start, s, cos, sin)

  sparse, _, idx = run(tiny_cfg)
  dense, _, no_idx = run(tiny_cfg.replace(index_topk=s))
  # in 8-query blocks the first two (positions < k) skip the scoring: every visible key, the same sets
  blocked, _, blocked_idx = run(tiny_cfg, EXACT_F32.replace(query_chunk=8))
  np.testing.assert_array_equal(np.sort(blocked_idx, -1), np.sort(idx, -1))
  assert rel_err(blocked, sparse) < 1e-6
  assert no_idx is None and idx.shape == (2, s, k)
  assert rel_err(sparse[:, :k], dense[:, :k]) < 1e-6     # rows 0..k-1 see <= k keys
  assert rel_err(sparse[:, k:], dense[:, k:]) > 1e-3     # later rows really are sparse
  valid = np.asarray(idx) >= 0
  assert (valid.sum(-1) == np.minimum(np.arange(s) + 1, k)[None]).all()
  assert (np.where(valid, np.asarray(idx), 0) <= np.arange(s)[None, :, None]).all()  # causal


@pytest.mark.parametrize("blocks", [1, 5])
def test_fused_mha_form_equals_the_reference(tiny_cfg, tiny_params_bf16, rng, monkeypatch, blocks):
  """The official form through ``jax.nn.dot_product_attention`` (cuDNN on a GPU; XLA's here, forced),
  in query blocks that read the keys only up to their last query, equals the reference's masked einsums:
  a prefill that selects (40 > index_topk), one that does not (12), and a prefill continued from slot 20."""
  import dsv32_jax.attention as attention_module
  from pallas_kernels import dispatch
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]
  x = jnp.asarray(rng.standard_normal((2, 40, tiny_cfg.dim)), jnp.float32)

  def run(first: int, last: int, cache=None):
    cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(first, last), (2, last - first)))
    cache = cache or cache_lib.init_cache(tiny_cfg, 1, 2, 40, jnp.float32, False)
    return attention(p, tiny_cfg, EXACT_F32, x[:, first:last], cache, jnp.int32(0), jnp.full(2, first, jnp.int32),
                     last, cos, sin)

  def all_cases():
    prefill, _, idx = run(0, 40)
    short, _, no_idx = run(0, 12)
    _, cache, _ = run(0, 20)
    continued, _, idx_continued = run(20, 40, cache)
    return prefill, idx, short, no_idx, continued, idx_continued

  want = all_cases()
  monkeypatch.setattr(dispatch, "fused_mha_implementation", lambda *a, **k: "xla")
  monkeypatch.setattr(attention_module, "FUSED_MASK_ELEMENTS", 2 * 40 * -(-40 // blocks))
  got = all_cases()
  assert got[3] is None and want[3] is None
  for g, w in zip(got[::2], want[::2]):
    assert rel_err(g, w) < 1e-5
  np.testing.assert_array_equal(np.sort(got[1], -1), np.sort(want[1], -1))
  np.testing.assert_array_equal(np.sort(got[5], -1), np.sort(want[5], -1))


@pytest.mark.parametrize("blocks", [1, 3])
def test_masked_kernel_form_equals_the_reference(tiny_cfg, tiny_params_bf16, rng, monkeypatch, blocks):
  """The official form through the masked-attention kernel (``pallas_kernels.masked_mha_mgpu``, in Mosaic GPU
  interpret mode here; bf16), the top-k set as bits (``topk_bits_gpu``, in Triton interpret mode), against the
  reference's masked einsums in bf16 with the same selections: a prefill that selects (40 > index_topk: its first index_topk queries causal without
  bits, the rest in ``blocks`` blocks), one that does not (12), and a prefill continued from slot 20."""
  check_masked_kernel_form(tiny_cfg, tiny_params_bf16, rng, monkeypatch, blocks, "interpret")


@pytest.mark.gpu
def test_masked_kernel_form_equals_the_reference_on_gpu(tiny_cfg, tiny_params_bf16, rng, monkeypatch):
  check_masked_kernel_form(tiny_cfg, tiny_params_bf16, rng, monkeypatch, 3, "mgpu")


def check_masked_kernel_form(tiny_cfg, tiny_params_bf16, rng, monkeypatch, blocks, implementation):
  import dsv32_jax.attention as attention_module
  from pallas_kernels import dispatch
  from pallas_kernels.topk_bits_gpu import topk_bits_gpu
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]
  x = jnp.asarray(rng.standard_normal((2, 40, tiny_cfg.dim)), jnp.bfloat16)
  opts = RunOptions(indexer_quant=False, kernels="reference")

  def run(first: int, last: int, cache=None):
    cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(first, last), (2, last - first)))
    cache = cache or cache_lib.init_cache(tiny_cfg, 1, 2, 40, jnp.bfloat16, False)
    return attention(p, tiny_cfg, opts, x[:, first:last], cache, jnp.int32(0), jnp.full(2, first, jnp.int32),
                     last, cos, sin)

  def all_cases():
    prefill, _, idx = run(0, 40)
    short, _, no_idx = run(0, 12)
    _, cache, _ = run(0, 20)
    continued, _, idx_continued = run(20, 40, cache)
    return prefill, idx, short, no_idx, continued, idx_continued

  want = all_cases()
  assert dispatch.fused_mha_implementation(jnp.bfloat16, tiny_cfg.qk_head_dim, "pallas", tiny_cfg.v_head_dim) in (
      "interpret", "mgpu")
  monkeypatch.setattr(dispatch, "fused_mha_implementation", lambda *a, **k: implementation)
  monkeypatch.setattr(attention_module, "FUSED_MASK_ELEMENTS", 2 * 40 * -(-(40 - tiny_cfg.index_topk) // blocks))

  def bits_kernel(logits, k, lengths, impl, config=None):  # the top-k-as-bits kernel, though the rest is the reference
    *lead, t = logits.shape
    return topk_bits_gpu(logits.reshape(-1, t), k, lengths.reshape(-1),
                         interpret=implementation == "interpret").reshape(*lead, -1)
  monkeypatch.setattr(dispatch, "topk_bits", bits_kernel)
  got = all_cases()
  assert got[3] is None and want[3] is None
  for g, w in zip(got[::2], want[::2]):
    assert rel_err(g, w) < 2e-2  # bf16 probabilities in the reference, float32 in the kernel
  np.testing.assert_array_equal(np.sort(got[1], -1), np.sort(want[1], -1))
  np.testing.assert_array_equal(np.sort(got[5], -1), np.sort(want[5], -1))


def test_long_prefills_take_the_gathered_form_where_the_kernels_run(tiny_cfg, tiny_params_bf16, rng, monkeypatch):
  """RunOptions.gathered_prefill_from: a prefill over more keys than that takes the latent form over the
  gathered rows when the DSA kernels run on them (forced here; the reference attends); a shorter one, or
  one where the kernels do not run, keeps the configured (official) form."""
  from pallas_kernels import dispatch
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]
  x = jnp.asarray(rng.standard_normal((2, 40, tiny_cfg.dim)), jnp.bfloat16)
  official = RunOptions(gathered_prefill_from=30)
  gathered = official.replace(prefill_attention="absorbed", prefill_selection="gather")

  def run(opts, s):
    cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(s), (2, s)))
    cache = cache_lib.init_cache(tiny_cfg, 1, 2, s, jnp.bfloat16)
    return np.asarray(attention(p, tiny_cfg, opts, x[:, :s], cache, jnp.int32(0), jnp.zeros(2, jnp.int32), s,
                                cos, sin)[0].astype(jnp.float32))

  assert rel_err(run(gathered, 40), run(official, 40)) > 1e-3  # the forms differ by bf16 rounding
  np.testing.assert_array_equal(run(official, 40), run(official.replace(gathered_prefill_from=None), 40))
  monkeypatch.setattr(dispatch, "gathered_dsa_runs_kernels", lambda *a, **k: True)
  np.testing.assert_array_equal(run(official, 40), run(gathered, 40))                 # 40 keys > 30
  np.testing.assert_array_equal(run(official, 24), run(official.replace(gathered_prefill_from=None), 24))
  with pytest.raises(ValueError, match="gathered_prefill_from"):
    RunOptions(gathered_prefill_from=0)


@pytest.mark.gpu
def test_official_form_runs_through_cudnn_on_gpu(tiny_cfg, tiny_params_bf16, rng, monkeypatch):
  """On a GPU the official form in bf16 can take cuDNN's fused attention (the default where the masked-attention
  kernel is not); against the bf16 reference's masked einsums (same selections: the float indexer and an exact
  top-k) the layer differs by bf16 rounding only."""
  from pallas_kernels import dispatch
  monkeypatch.setattr(dispatch, "MASKED_MHA_BY_DEFAULT", False)
  assert dispatch.fused_mha_implementation(jnp.bfloat16, tiny_cfg.qk_head_dim) == "cudnn"
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]
  s = 300
  x = jnp.asarray(rng.standard_normal((2, s, tiny_cfg.dim)), jnp.bfloat16)
  cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(s), (2, s)))

  def run(kernels):
    opts = RunOptions(indexer_quant=False, kernels=kernels)
    cache = cache_lib.init_cache(tiny_cfg, 1, 2, s, jnp.bfloat16, False)
    return jax.jit(lambda p, x, c: attention(p, tiny_cfg, opts, x, c, jnp.int32(0), jnp.zeros(2, jnp.int32), s,
                                             cos, sin))(p, x, cache)

  got, _, got_idx = run("auto")
  want, _, want_idx = run("reference")
  np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(want_idx, -1))
  assert rel_err(got, want) < 1e-2


def test_layer_benchmarks_dense_baseline_is_the_models_dense_attention(tiny_cfg, tiny_params_bf16, rng):
  """benchmarks/layer_671b.py's dense baseline (jax.nn.dot_product_attention) computes the model's attention
  with every key attended, so the DSA-vs-dense ratio compares the same layer."""
  from benchmarks.layer_671b import dense_attention
  s = 24
  cfg = tiny_cfg.replace(index_topk=s)  # every key attended
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]
  x = jnp.asarray(rng.standard_normal((2, s, cfg.dim)), jnp.float32)
  cos, sin = rope_angles(cfg, jnp.broadcast_to(jnp.arange(s), (2, s)))
  cache = cache_lib.init_cache(cfg, 1, 2, s, jnp.float32, False)
  want, _, _ = attention(p, cfg, EXACT_F32, x, cache, jnp.int32(0), jnp.zeros(2, jnp.int32), s, cos, sin)
  assert rel_err(dense_attention(p, cfg, EXACT_F32, x, cos, sin), want) < 1e-5


def test_batched_prompts_of_different_lengths(tiny_cfg, tiny_params_fp8, rng):
  """Right-padded batch = each prompt alone (greedy, float32)."""
  prompts = [rng.integers(2, tiny_cfg.vocab_size, n).tolist() for n in (37, 9, 22)]
  batch = generate(tiny_params_fp8, tiny_cfg, F32_FP8, prompts, 12, stop_at_eos=False)
  for prompt, got in zip(prompts, batch.tokens):
    alone = generate(tiny_params_fp8, tiny_cfg, F32_FP8, [prompt], 12, stop_at_eos=False, max_len=64)
    assert got == alone.tokens[0]
  assert batch.decode_steps == 11 and batch.prompt_tokens == 68


def test_generation_errors(tiny_cfg, tiny_params_fp8):
  run = lambda prompts, n=4, **kw: generate(tiny_params_fp8, tiny_cfg, F32_FP8, prompts, n, **kw)  # noqa: E731
  with pytest.raises(GenerationError, match="outside the vocabulary"):
    run([[1, 2, tiny_cfg.vocab_size]])
  with pytest.raises(GenerationError, match="exceed the cache of 16 positions"):
    run([list(range(2, 16))], n=4, max_len=16)
  with pytest.raises(GenerationError, match="prompt 1 is empty"):
    run([[3], []])
  with pytest.raises(GenerationError, match="max_position_embeddings"):
    run([[3]], max_len=tiny_cfg.max_seq_len + 64)


def test_mtp_module(tiny_cfg, tiny_params_fp8, rng):
  """MTP: eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> one MoE block -> shared_head.norm -> main head."""
  cfg, params = tiny_cfg, tiny_params_fp8
  tokens = tokens_for(cfg, rng, 2, 30)
  b, s = tokens.shape
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, s, jnp.float32)
  start = jnp.zeros(b, jnp.int32)
  hidden, _ = jax.jit(lambda p, t, c: model.forward(p, cfg, F32_FP8, t, start, c, kv_len=s))(params, tokens, cache)
  nxt = jnp.roll(tokens, -1, axis=1)
  mtp_cache = cache_lib.init_cache(cfg, cfg.n_mtp_layers, b, s, jnp.float32)
  out, _ = jax.jit(lambda p, h, t, c: model.mtp_forward(p, cfg, F32_FP8, h, t, start, c, kv_len=s))(
      params, hidden, nxt, mtp_cache)
  assert out.shape == hidden.shape and bool(jnp.isfinite(out).all())
  # written out by hand
  p = jax.tree.map(lambda a: a[0], params["mtp"])
  e = rms_norm(params["embed"][nxt].astype(jnp.float32), p["enorm"], cfg.norm_eps)
  h = rms_norm(hidden, p["hnorm"], cfg.norm_eps)
  w = jnp.asarray(p["eh_proj"]["weight"], jnp.float32)
  z = jnp.concatenate([e, h], -1) @ w.T
  cos, sin = rope_angles(cfg, jnp.broadcast_to(jnp.arange(s), (b, s)))
  run_block = jax.jit(lambda p, z, c: model.block(p, cfg, F32_FP8, z, c, jnp.int32(0), start, s, cos, sin, True)[0])
  ref = rms_norm(run_block(p["block"], z, mtp_cache), p["norm"], cfg.norm_eps)
  assert rel_err(out, ref) < 1e-5
  swapped = jnp.concatenate([h, e], -1) @ w.T  # the order matters: embedding first
  assert rel_err(swapped, jnp.concatenate([e, h], -1) @ w.T) > 0.1
  assert model.logits(params, out).shape == (b, s, cfg.vocab_size)


def test_fp8_linears_take_the_run_options_linear_kernels(tiny_cfg, tiny_params_fp8, monkeypatch):
  """Every FP8 linear of a decoder block (MLA and indexer projections, wo, the shared expert) asks the
  dispatch with ``RunOptions.linear_kernels``: the kernels setting, or "reference" with
  ``fp8_linear_kernel=False``."""
  from pallas_kernels import dispatch
  asked = []
  real = dispatch.fp8_linear_backend
  monkeypatch.setattr(dispatch, "fp8_linear_backend", lambda impl, *a: asked.append(impl) or real(impl, *a))
  p = jax.tree.map(lambda a: a[0], tiny_params_fp8["moe_layers"])
  s = tiny_cfg.index_topk + 8  # the indexer selects: its queries' projection runs too
  cos, sin = rope_angles(tiny_cfg, jnp.broadcast_to(jnp.arange(s), (1, s)))
  h = jnp.ones((1, s, tiny_cfg.dim), jnp.bfloat16)

  def trace(opts):
    asked.clear()
    cache = cache_lib.init_cache(tiny_cfg, 1, 1, s, jnp.bfloat16)
    jax.eval_shape(lambda: model.block(p, tiny_cfg, opts, h, cache, jnp.int32(0), jnp.zeros(1, jnp.int32), s, cos,
                                       sin, True))
    return list(asked)

  assert RunOptions().linear_kernels == "auto"
  # wq_a, wq_b, wkv_a, wkv_b (the official form's keys and values), the indexer's wk and wq_b, wo, and the
  # shared expert's w1, w3, w2
  assert trace(RunOptions()) == ["auto"] * 10
  assert set(trace(RunOptions(fp8_linear_kernel=False))) == {"reference"}
