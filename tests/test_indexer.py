"""The lightning indexer reference: score formula, Hadamard rotation, FP8, top-k selection."""

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax import indexer, quant
from dsv32_jax.rope import rope_angles
from tests.conftest import rel_err


def logits_numpy(q, w, k, k_scale, allowed):
  """I[b,t,s] = k_scale[s] * sum_h w[t,h] relu(q[t,h].k[s]), float64."""
  dots = np.einsum("bshd,btd->bsht", q.astype(np.float64), k.astype(np.float64))
  out = np.einsum("bsht,bsh->bst", np.maximum(dots, 0), w.astype(np.float64)) * k_scale[:, None, :]
  return np.where(allowed, out, -np.inf)


def test_index_logits_formula(rng):
  b, s, t, h, d = 2, 9, 23, 4, 128
  q = rng.standard_normal((b, s, h, d)).astype(np.float32)
  k = rng.standard_normal((b, t, d)).astype(np.float32)
  w = rng.standard_normal((b, s, h)).astype(np.float32)
  ks = rng.uniform(0.5, 2, (b, t)).astype(np.float32)
  allowed = rng.random((b, s, t)) < 0.7
  ours = np.asarray(indexer.index_logits(*map(jnp.asarray, (q, w, k, ks, allowed))))
  ref = logits_numpy(q, w, k, ks, allowed)
  assert np.array_equal(np.isinf(ours), np.isinf(ref))
  assert rel_err(ours[allowed], ref[allowed]) < 1e-6


def test_fp8_operands_are_used_exactly(rng):
  q8, _ = quant.act_quant(jnp.asarray(rng.standard_normal((1, 3, 2, 128)), jnp.float32))
  k8, ks = quant.act_quant(jnp.asarray(rng.standard_normal((1, 5, 128)), jnp.float32))
  w = rng.standard_normal((1, 3, 2)).astype(np.float32)
  allowed = np.ones((1, 3, 5), bool)
  ours = indexer.index_logits(q8, jnp.asarray(w), k8, ks[..., 0], jnp.asarray(allowed))
  ref = logits_numpy(np.asarray(q8).astype(np.float32), w, np.asarray(k8).astype(np.float32),
                     np.asarray(ks[..., 0]), allowed)
  assert rel_err(ours, ref) < 1e-6


def test_hadamard_is_orthonormal_and_a_no_op_without_quantisation(rng):
  hm = indexer.hadamard_matrix(128)
  np.testing.assert_array_equal(hm @ hm.T, 128 * np.eye(128))
  q = jnp.asarray(rng.standard_normal((2, 6, 4, 128)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 11, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
  ones = jnp.ones((2, 11))
  allowed = jnp.ones((2, 6, 11), bool)
  plain = indexer.index_logits(q, w, k, ones, allowed)
  rotated = indexer.index_logits(indexer.hadamard(q), w, indexer.hadamard(k), ones, allowed)
  assert rel_err(rotated, plain) < 1e-6


def test_hadamard_reduces_fp8_error_on_outliers(rng):
  """Outlier channels that queries and keys share dominate the dot products, and each dominant term
  carries one e4m3 rounding error; rotated, every channel carries a share of them and the independent
  rounding errors average out (about sqrt(128) smaller). (Outliers in channels that do not meet in
  the dot product would instead add rounding noise: the rotation is for systematic, shared ones.)"""
  b, s, t, h, d = 1, 16, 64, 4, 128
  q = rng.standard_normal((b, s, h, d)).astype(np.float32)
  k = rng.standard_normal((b, t, d)).astype(np.float32)
  q[..., :2] *= 30.0
  k[..., :2] *= 30.0
  w = rng.uniform(0.1, 1, (b, s, h)).astype(np.float32)
  allowed = jnp.ones((b, s, t), bool)
  exact = indexer.index_logits(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.ones((b, t)), allowed)

  def fp8_logits(q, k):
    q8, qs = quant.act_quant(q)
    k8, kscale = quant.act_quant(k)
    return indexer.index_logits(q8, jnp.asarray(w) * qs[..., 0], k8, kscale[..., 0], allowed)

  plain = rel_err(fp8_logits(jnp.asarray(q), jnp.asarray(k)), exact)
  rotated = rel_err(fp8_logits(indexer.hadamard(jnp.asarray(q)), indexer.hadamard(jnp.asarray(k))), exact)
  assert rotated < 0.3 * plain, (rotated, plain)


def test_select_topk_invalid_slots_and_ties():
  logits = jnp.array([[[3.0, -jnp.inf, 1.0, -jnp.inf, 2.0]],
                      [[1.0, 1.0, 1.0, 0.5, 1.0]]])
  idx = np.asarray(indexer.select_topk(logits, 4))
  assert idx[0, 0].tolist() == [0, 4, 2, -1]
  assert idx[1, 0].tolist() == [0, 1, 2, 4]   # ties go to the lower key index


def test_quantised_indexer_tracks_the_unquantised_one(tiny_cfg, tiny_params_bf16, rng):
  """The released FP8 indexer vs the same indexer without FP8: close scores, mostly the same top-k."""
  cfg = tiny_cfg
  p = jax.tree.map(lambda a: a[0], tiny_params_bf16["moe_layers"])["attn"]["indexer"]
  b, s = 2, 64
  x = jnp.asarray(rng.standard_normal((b, s, cfg.dim)), jnp.float32)
  qr = jnp.asarray(rng.standard_normal((b, s, cfg.q_lora_rank)), jnp.float32)
  cos, sin = rope_angles(cfg, jnp.broadcast_to(jnp.arange(s), (b, s)))
  allowed = jnp.tril(jnp.ones((s, s), bool))[None]
  out = {}
  for quantize in (False, True):
    k, ks = indexer.indexer_keys(p, cfg, x, cos, sin, quantize)
    q, w = indexer.indexer_queries(p, cfg, x, qr, cos, sin, quantize)
    out[quantize] = indexer.index_logits(q, w, k, ks, allowed)
    assert (k.dtype == quant.FP8) == quantize
  valid = np.asarray(jnp.broadcast_to(allowed, out[True].shape))
  assert rel_err(np.asarray(out[True])[valid], np.asarray(out[False])[valid]) < 0.1
  a = np.asarray(indexer.select_topk(out[True], cfg.index_topk))
  e = np.asarray(indexer.select_topk(out[False], cfg.index_topk))
  overlap = np.mean([len(set(a[i, t]) & set(e[i, t])) / cfg.index_topk for i in range(b) for t in range(16, s)])
  assert overlap > 0.8
