"""MoE routing and the grouped-matmul experts against independent numpy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import moe
from dsv32_jax.config import preset
from pallas_kernels import dispatch
from tests.conftest import rel_err


def route_numpy(x, gate_w, bias, n_groups, topk_groups, k, route_scale):
  """The official Gate.forward, one token at a time, float64."""
  weights, ids = [], []
  for xt in x.astype(np.float64):
    s = 1 / (1 + np.exp(-(gate_w.astype(np.float64) @ xt)))
    sel = (s + bias).reshape(n_groups, -1)
    group_score = np.sort(sel, axis=1)[:, -2:].sum(1)
    keep = np.argsort(-group_score, kind="stable")[:topk_groups]
    masked = np.full_like(sel, -np.inf)
    masked[keep] = sel[keep]
    chosen = np.argsort(-masked.reshape(-1), kind="stable")[:k]
    w = s[chosen] / s[chosen].sum() * route_scale
    order = np.argsort(chosen)
    ids.append(chosen[order])
    weights.append(w[order])
  return np.array(weights), np.array(ids)


def test_routing_equals_numpy(rng):
  cfg = preset("tiny").replace(n_routed_experts=32, n_expert_groups=8, n_limited_groups=3, n_activated_experts=6)
  x = rng.standard_normal((97, cfg.dim)).astype(np.float32)
  gate = {"weight": rng.standard_normal((32, cfg.dim)).astype(np.float32) * cfg.dim ** -0.5,
          "bias": (0.3 * rng.standard_normal(32)).astype(np.float32)}
  w, idx = moe.route(jax.tree.map(jnp.asarray, gate), cfg, jnp.asarray(x))
  order = np.argsort(np.asarray(idx), axis=1)
  w_ref, idx_ref = route_numpy(x, gate["weight"], gate["bias"], 8, 3, 6, cfg.route_scale)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1), idx_ref)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1), w_ref, rtol=1e-5)
  # the bias changes the choice but not the weights' source: weights sum to route_scale
  np.testing.assert_allclose(np.asarray(w).sum(1), cfg.route_scale, rtol=1e-5)
  w_nobias, idx_nobias = moe.route({"weight": jnp.asarray(gate["weight"]), "bias": jnp.zeros(32)}, cfg, jnp.asarray(x))
  assert not np.array_equal(np.sort(np.asarray(idx_nobias), 1), idx_ref)


def test_routed_experts_equal_a_per_token_loop(rng):
  cfg = preset("tiny")
  n, e, d, i = 50, cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
  p = {name: {"weight": rng.standard_normal(shape).astype(np.float32) * shape[-1] ** -0.5}
       for name, shape in (("w1", (e, i, d)), ("w3", (e, i, d)), ("w2", (e, d, i)))}
  x = rng.standard_normal((n, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, cfg.n_activated_experts, replace=False) for _ in range(n)]).astype(np.int32)
  idx[:, 0] = 3  # a popular expert; some experts get no rows at all
  w = rng.uniform(0.1, 1, idx.shape).astype(np.float32)
  out = moe.routed_experts(jax.tree.map(jnp.asarray, p), cfg, jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx))
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  ref = np.zeros((n, d))
  for t in range(n):
    for j, ex in enumerate(idx[t]):
      h = silu(p["w1"]["weight"][ex] @ x[t]) * (p["w3"]["weight"][ex] @ x[t])
      ref[t] += w[t, j] * (p["w2"]["weight"][ex] @ h)
  assert rel_err(out, ref) < 1e-5


def test_grouped_matmul_reference_with_empty_groups(rng):
  sizes = np.array([5, 0, 17, 0, 1, 9], np.int32)
  x = rng.standard_normal((sizes.sum(), 64)).astype(np.float32)
  w = rng.standard_normal((6, 48, 64)).astype(np.float32)
  out = dispatch.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl="reference")
  groups = np.repeat(np.arange(6), sizes)
  ref = np.einsum("mk,mnk->mn", x, w[groups])
  assert rel_err(out, ref) < 1e-6


def test_dispatch_refuses_the_gpu_kernel_off_gpu():
  if dispatch.on_gpu():
    pytest.skip("on a GPU the kernel runs")
  with pytest.raises(RuntimeError, match="needs a GPU"):
    dispatch.grouped_matmul(jnp.ones((4, 64)), jnp.ones((2, 128, 64)), jnp.array([2, 2]), impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    dispatch.grouped_matmul(jnp.ones((4, 64)), jnp.ones((2, 128, 64)), jnp.array([2, 2]), impl="fast")


@pytest.mark.gpu
def test_grouped_matmul_mosaic_gpu_matches_reference(rng):
  sizes = np.array([300, 0, 17, 0, 1, 190, 0, 4], np.int32)
  x = jnp.asarray(rng.standard_normal((sizes.sum(), 512)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((8, 256, 512)) * 512 ** -0.5, jnp.bfloat16)
  out = dispatch.grouped_matmul(x, w, jnp.asarray(sizes), impl="pallas")
  ref = dispatch.grouped_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(sizes))
  assert rel_err(out.astype(jnp.float32), ref) < 1e-2
