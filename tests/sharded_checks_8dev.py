"""Sharded = unsharded on 8 CPU devices: whole-model logits per mesh, both expert-dispatch paths, the
dense ragged all-to-all, and ahead-of-time memory per device.

Not collected by the main run (no ``test_`` prefix): ``tests/test_sharding.py`` runs this file in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX
initialises.
"""

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv32_jax import moe
from dsv32_jax.config import preset
from dsv32_jax.params import init_params
from sharding import expert_parallel, rules
from sharding.plan import ShardingPlan, abstract_cache, abstract_params, bytes_per_device
from tests.sharding_common import (BATCH, CACHE_LEN, EXACT_F32, F32_FP8, PROMPT, inputs, reference_logits,
                                   rel_err, sharded_logits)

if jax.device_count() != 8:
  pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (run through tests/test_sharding.py)",
              allow_module_level=True)

jax.config.update("jax_default_matmul_precision", "highest")
# tiny, with experts of two 128-wide FP8 blocks so that tensor parallelism inside experts is exercised too
CFG = preset("tiny").replace(index_topk=16, moe_inter_dim=256)
SEED = int(os.environ.get("SHARDING_TEST_SEED", "5"))


@functools.lru_cache(maxsize=None)
def params(weights: str):
  return init_params(CFG, seed=11 if weights == "fp8" else 12, fp8=weights == "fp8")


@functools.lru_cache(maxsize=None)
def reference(weights: str, exact: bool):
  tokens, lengths, feed = inputs(CFG, SEED)
  return reference_logits(CFG, params(weights), EXACT_F32 if exact else F32_FP8, tokens, lengths, feed)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)])
def test_prefill_and_decode_logits_equal_unsharded(mesh_shape):
  weights, exact = "fp8", False
  plan = ShardingPlan(rules.make_mesh(*mesh_shape))
  tokens, lengths, feed = inputs(CFG, SEED)
  prefill, decode, params_on_mesh, cache, prefill_fn = sharded_logits(plan, CFG, params(weights), EXACT_F32 if exact else F32_FP8,
                                                          tokens, lengths, feed)
  ref_prefill, ref_decode = reference(weights, exact)
  assert rel_err(prefill, ref_prefill) < 1e-5
  assert rel_err(decode, ref_decode) < 1e-5

  data, expert, tensor = mesh_shape
  w1 = params_on_mesh["moe_layers"]["ffn"]["experts"]["w1"]["weight"]
  assert w1.sharding.shard_shape(w1.shape)[1] == CFG.n_routed_experts // expert  # no device holds all experts
  layout = expert_parallel.expert_layout(plan, CFG, jax.tree.map(lambda a: a[0], params_on_mesh["moe_layers"]["ffn"]["experts"]))
  assert layout.ep_axes == (("expert",) if expert > 1 else ())
  assert layout.tp_axes == (("tensor",) if tensor > 1 else ())  # each expert's hidden units split too
  wq_b = params_on_mesh["moe_layers"]["attn"]["wq_b"]["weight"]
  assert wq_b.sharding.shard_shape(wq_b.shape)[1] == wq_b.shape[1] // tensor  # heads split over tensor
  batch_ways = data * (expert if BATCH % (data * expert) == 0 else 1)
  assert cache.kv.sharding.shard_shape(cache.kv.shape)[1] == BATCH // batch_ways

  # Ahead of time, from abstract inputs (no weights): the same executable, and its per-device arguments are
  # exactly the shards the rules place on one device.
  abstract = abstract_params(plan, CFG, fp8=True)
  assert jax.tree.map(lambda a: (a.dtype, a.sharding), abstract) == jax.tree.map(lambda a: (a.dtype, a.sharding),
                                                                                  params_on_mesh)
  tokens_abs = jax.ShapeDtypeStruct((BATCH, PROMPT), jnp.int32, sharding=prefill_fn.in_shardings[1])
  lengths_abs = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=prefill_fn.in_shardings[2])
  cache_abs = abstract_cache(plan, CFG, CFG.n_layers, BATCH, CACHE_LEN, jnp.float32)
  memory = prefill_fn.lower(abstract, tokens_abs, lengths_abs, cache_abs).compile().memory_analysis()
  used = {k: v for k, v in abstract.items() if k != "mtp"}  # jit drops arguments the prefill does not read
  assert memory.argument_size_in_bytes == (bytes_per_device(used) + bytes_per_device(cache_abs)
                                           + bytes_per_device((tokens_abs, lengths_abs)))
  everything = sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(used))
  if expert * tensor > 1:
    assert bytes_per_device(used) < 0.75 * everything


def _moe_inputs(rng, shape, skew: bool):
  p = jax.tree.map(lambda a: jnp.asarray(a[0]), params("fp8")["moe_layers"]["ffn"])
  if skew:  # every token picks experts 0 and 1 (both on device 0 of an 8-way expert axis) first
    p["gate"]["bias"] = p["gate"]["bias"].at[:2].add(100.0)
  x = jnp.asarray(rng.standard_normal((*shape, CFG.dim)), jnp.float32)
  return p, x


def _most_rows_received(p, x, ep_size):
  """Host-side count of the rows the busiest device of the EP group receives in one round."""
  _, idx = moe.route(p["gate"], CFG, x.reshape(-1, CFG.dim))
  owner = np.asarray(idx).reshape(-1) // (CFG.n_routed_experts // ep_size)
  return np.bincount(owner, minlength=ep_size).max()


@functools.lru_cache(maxsize=None)
def moe_fns(capacity_factor: float, round_rows: int):
  """(reference MoE, expert-parallel MoE on an 8-way expert axis), jitted once per setting."""
  plan = ShardingPlan(rules.make_mesh(1, 8, 1), expert_capacity_factor=capacity_factor, expert_round_rows=round_rows)
  return (jax.jit(lambda p, x: moe.moe(p, CFG, x, impl="reference")),
          jax.jit(lambda p, x: plan.moe(p, CFG, x, impl="reference")))


@pytest.mark.parametrize("case", ["balanced", "skewed", "rounds"])
def test_expert_parallel_moe_equals_reference_on_both_dispatch_paths(case):
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  p, x = _moe_inputs(rng, (3, 32) if case != "rounds" else (3, 7), skew=case == "skewed")
  # rounds: 21 tokens, 3 per device, dispatched one at a time (16 rows = 8 peers x 2 local experts per token)
  reference_moe, parallel_moe = moe_fns(2.5, 16 if case == "rounds" else 65536)
  if case == "rounds":
    assert expert_parallel.tokens_per_round(CFG, 8, 16) == 1
  assert rel_err(parallel_moe(p, x), reference_moe(p, x)) < 1e-6
  if case != "rounds":  # 96 tokens: 12 per device, one round
    fast, worst = expert_parallel.receive_bounds(12, CFG, 8, 2.5)
    need = _most_rows_received(p, x, 8)
    assert fast < worst
    assert (need > fast) == (case == "skewed")  # the skewed routing overflows the fast buffer: worst-case path
    assert need <= worst


def test_dense_ragged_all_to_all_has_ragged_all_to_all_semantics():
  """Against the semantics in jax.lax.ragged_all_to_all's documentation, with gaps and empty slices."""
  rng = np.random.default_rng(7)
  peers, slices, n, m, f = 8, 3, 80, 80, 5
  operand = rng.standard_normal((peers, n, f)).astype(np.float32)
  send = rng.integers(0, 4, (peers, peers * slices)).astype(np.int32)   # [sender, slice]
  send[0, :slices] = 0                                                  # nothing from 0 to itself
  in_off = np.zeros_like(send)
  out_off = np.zeros_like(send)
  for s in range(peers):  # sender s packs its slices with random gaps
    pos = 0
    for i in range(peers * slices):
      pos += rng.integers(0, 2)
      in_off[s, i] = pos
      pos += send[s, i]
    assert pos <= n
  for r in range(peers):  # receiver r places incoming slices (from each sender, each of its slices) with gaps
    pos = 0
    for s in range(peers):
      for j in range(slices):
        pos += rng.integers(0, 2)
        out_off[s, r * slices + j] = pos
        pos += send[s, r * slices + j]
    assert pos <= m
  recv = np.stack([send[:, r * slices:(r + 1) * slices].reshape(-1) for r in range(peers)])  # [receiver, slice]
  expected = np.zeros((peers, m, f), np.float32)
  for s in range(peers):
    for i in range(peers * slices):
      r = i // slices
      rows = operand[s, in_off[s, i]:in_off[s, i] + send[s, i]]
      expected[r, out_off[s, i]:out_off[s, i] + send[s, i]] = rows

  mesh = rules.make_mesh(1, 8, 1)
  capacity = int(send.reshape(peers, peers, slices).sum(-1).max())

  def local(operand, in_off, send, out_off, recv):
    return expert_parallel.dense_ragged_all_to_all(
        operand[0], jnp.zeros((m, f), operand.dtype), in_off[0], send[0], out_off[0], recv[0], axis_name="expert",
        n_peers=peers, capacity=capacity)[None]

  out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))(
      operand, in_off, send, out_off, recv)
  np.testing.assert_array_equal(np.asarray(out), expected)


