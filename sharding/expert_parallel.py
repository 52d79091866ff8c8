"""Expert parallelism for the DeepSeek MoE: tokens travel to the devices that hold their experts and back.

The routed experts are split along the mesh axes the rules give the ``experts`` logical axis (the EP
group, ``n_ep`` devices holding ``E / n_ep`` experts each: no device holds all of them), and each
expert's hidden units along those of ``expert_mlp`` (tensor parallelism inside the experts). Tokens are
split along every other mesh axis. Inside ``jax.shard_map`` each device, for its own tokens:

  1. routes them (the reference ``moe.route``: the gate is replicated) and sorts the (token, slot)
     pairs by expert, exactly as the single-device path does;
  2. all-gathers its per-expert row counts over the EP group: with the [sender, expert] count matrix
     every device knows where every row goes and comes from, with no further handshake;
  3. sends each expert's rows to the device holding it with one ragged all-to-all of ``E`` slices
     (``E / n_ep`` per peer), placed so that they arrive already sorted by local expert (expert-major,
     sender-minor): the receiver runs the reference ``moe.grouped_swiglu`` on them directly;
  4. sends the results back with the inverse ragged all-to-all, so they land at the positions the
     rows left from, and combines them (weights x expert outputs, scatter-added in float32) as the
     single-device path does; partial sums over ``expert_mlp`` are reduced over its mesh axes;
  5. the shared expert runs outside, under the rules (its hidden units split like a dense FFN).

Why ``ragged_all_to_all`` and not ``all_to_all`` with a capacity: the model must give the reference's
logits, so no (token, expert) pair may be dropped. A fixed per-peer capacity that can never overflow is
``tokens x min(top_k, experts per device)`` rows to *each* peer, ``n_ep`` times the traffic actually
needed; the ragged collective sends exactly the routed rows. What stays static is the *receive* buffer:
its worst case, ``n_ep x tokens x min(top_k, experts per device)`` rows, is memory, not traffic, and is
bounded by dispatching few enough tokens per device at a time (``ShardingPlan.expert_round_rows``). The usual case
uses a smaller buffer (``expert_capacity_factor`` x the average share); whether any device of the mesh
would overflow it is known from the count matrix before anything is sent (one scalar ``pmax``), and then
every device takes the worst-case buffer for that round: exact always, small buffers when routing is
balanced.

With experts split over ``expert_mlp`` too, each device's w2 output is a partial sum; the partial sums
are reduced once per token after the combine (float32), not per row: with float32 activations this is
the reference's arithmetic up to summation order; in bf16 the reference rounds each row's expert
output to bf16 before weighting, this path rounds the reduced sum (one rounding fewer).

XLA:CPU has no ragged all-to-all, so on CPU (tests, and as a fallback anywhere) the same exchange runs
as ``dense_ragged_all_to_all``: an ``all_to_all`` of per-peer buffers padded to a bound that cannot
overflow, each row carrying its destination offset. Both give identical results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import swiglu
from dsv32_jax.moe import grouped_swiglu, route
from dsv32_jax.params import moe_specs
from sharding import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
  """Which mesh axes do what inside the expert-parallel MoE (all derived from the rules)."""

  ep_axes: tuple[str, ...]       # the experts are split along these (the EP group)
  tp_axes: tuple[str, ...]       # each expert's hidden units are split along these
  token_axes: tuple[str, ...]    # tokens are split along these (every mesh axis but tp_axes)
  ep_size: int
  token_shards: int
  expert_specs: Any              # PartitionSpecs of one layer's experts subtree

  @property
  def other_axes(self) -> tuple[str, ...]:
    """Mesh axes outside the EP group (all devices must agree on the dispatch path)."""
    return tuple(a for a in rules_lib.MESH_AXES if a not in self.ep_axes)


def expert_layout(plan, cfg: ModelConfig, experts: dict) -> ExpertLayout:
  from sharding.plan import map_params

  specs = map_params(lambda a, axes, shapes: plan.spec(axes, *shapes), cfg, experts,
                     specs=moe_specs(cfg)["experts"])
  w1, w2 = specs["w1"]["weight"], specs["w2"]["weight"]
  padded = lambda spec: tuple(spec) + (None,) * (3 - len(spec))  # noqa: E731
  (e1, i1, d1), (e2, d2, i2) = padded(w1), padded(w2)
  ep_axes, tp_axes = rules_lib.spec_axes(e1), rules_lib.spec_axes(i1)
  if (rules_lib.spec_axes(e2), rules_lib.spec_axes(i2)) != (ep_axes, tp_axes) or d1 is not None or d2 is not None:
    raise ValueError(f"expert parallelism needs w1 {w1} and w2 {w2} split alike on experts / expert_mlp and "
                     "not on embed: check the rules for 'experts', 'expert_mlp' and 'embed'")
  mesh = plan.mesh
  token_axes = tuple(a for a in rules_lib.MESH_AXES if a not in tp_axes and mesh.shape[a] > 1)
  return ExpertLayout(ep_axes=ep_axes, tp_axes=tp_axes, token_axes=token_axes,
                      ep_size=rules_lib.mesh_size(mesh, ep_axes), token_shards=rules_lib.mesh_size(mesh, token_axes),
                      expert_specs=specs)


def expert_parallel_moe(plan, p: dict, cfg: ModelConfig, x: Float[Array, "b s d"], impl: str = "auto"):
  """The MoE block (routed experts + shared expert) with the routed experts split over the mesh.

  Same contract and the same arithmetic per (token, expert) pair as ``dsv32_jax.moe.moe``.
  """
  b, s, d = x.shape
  layout = expert_layout(plan, cfg, p["experts"])
  x = plan.constrain(x, rules_lib.RESIDUAL)  # stops the token layout below from propagating into attention
  tokens = x.reshape(b * s, d)
  n = b * s
  per_device = -(-n // layout.token_shards)
  per_round = min(per_device, tokens_per_round(cfg, layout.ep_size, plan.expert_round_rows))
  per_device = -(-per_device // per_round) * per_round
  padded = per_device * layout.token_shards
  valid = jnp.arange(padded) < n  # padding tokens are routed to no expert
  token_spec = P(layout.token_axes or None)
  local = functools.partial(_local_moe, cfg=cfg, impl=impl, layout=layout, per_round=per_round,
                            exchange=plan.exchange, capacity_factor=plan.expert_capacity_factor)
  routed = jax.shard_map(local, mesh=plan.mesh,
                         in_specs=(token_spec, token_spec, P(), layout.expert_specs),
                         out_specs=token_spec, check_vma=False)(  # outputs equal over tp_axes: psum in _local_moe
      jnp.pad(tokens, ((0, padded - n), (0, 0))), valid, p["gate"], p["experts"])
  y = routed[:n]
  if "shared" in p:
    y = y + swiglu(p["shared"], tokens).astype(jnp.float32)
  return plan.constrain(y.astype(x.dtype).reshape(b, s, d), rules_lib.RESIDUAL)


def _local_moe(x: Float[Array, "n d"], valid: Bool[Array, "n"], gate: dict, experts: dict, *, cfg: ModelConfig,
               impl: str, layout: ExpertLayout, per_round: int, exchange: str,
               capacity_factor: float | None) -> Float[Array, "n d"]:
  """One device's tokens -> their routed-expert outputs (float32), in rounds of `per_round` tokens."""
  n, d = x.shape
  round_fn = functools.partial(_dispatch_round, gate=gate, experts=experts, cfg=cfg, impl=impl, layout=layout,
                               exchange=exchange, capacity_factor=capacity_factor)
  if n == per_round:
    y = round_fn(x, valid)
  else:
    rounds = n // per_round
    y = jax.lax.map(lambda xv: round_fn(*xv), (x.reshape(rounds, per_round, d), valid.reshape(rounds, per_round)))
    y = y.reshape(n, d)
  if layout.tp_axes:  # each device computed part of every expert's hidden units
    y = jax.lax.psum(y, layout.tp_axes)
  return y


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def _dispatch_round(x: Float[Array, "n d"], valid: Bool[Array, "n"], *, gate: dict, experts: dict, cfg: ModelConfig,
                    impl: str, layout: ExpertLayout, exchange: str, capacity_factor: float | None):
  n, d = x.shape
  k, e = cfg.n_activated_experts, cfg.n_routed_experts
  weights, idx = route(gate, cfg, x)
  idx = jnp.where(valid[:, None], idx, e)               # padding: a sentinel expert past the last
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)                # (token, slot) pairs sorted by expert, as the reference
  token = order // k
  counts = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
  rows = x[token]
  if layout.ep_size == 1:
    out = grouped_swiglu(experts, rows, counts, impl)
    out = jnp.where((jnp.arange(n * k) < counts.sum())[:, None], out, 0)  # padding rows: no expert ran
  else:
    out = _exchange_and_compute(rows, counts, experts, cfg=cfg, impl=impl, layout=layout, exchange=exchange,
                                capacity_factor=capacity_factor)
  weighted = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((n, d), jnp.float32).at[token].add(weighted)


def tokens_per_round(cfg: ModelConfig, ep_size: int, round_rows: int) -> int:
  """Tokens one device dispatches at once so that the worst-case receive buffer has at most round_rows rows."""
  return max(1, round_rows // (ep_size * min(cfg.n_activated_experts, cfg.n_routed_experts // ep_size)))


def receive_bounds(tokens: int, cfg: ModelConfig, ep_size: int, capacity_factor: float | None) -> tuple[int, int]:
  """(fast, worst) receive-buffer rows per device for `tokens` tokens dispatched by each device.

  worst: every token of every peer picks min(top_k, local experts) of this device's experts -- the most
  one device can ever receive. fast: capacity_factor x the average (tokens x top_k), at most worst.
  """
  k, local = cfg.n_activated_experts, cfg.n_routed_experts // ep_size
  worst = ep_size * tokens * min(k, local)
  if capacity_factor is None:
    return worst, worst
  fast = -(-math.ceil(capacity_factor * tokens * k) // 8) * 8
  return min(fast, worst), worst


def _exchange_and_compute(rows: Float[Array, "m d"], counts: Int[Array, "e"], experts: dict, *, cfg: ModelConfig,
                          impl: str, layout: ExpertLayout, exchange: str,
                          capacity_factor: float | None) -> Float[Array, "m d"]:
  """Sends sorted rows to their experts' devices, runs the local experts, returns results in place."""
  m, d = rows.shape
  e, k = cfg.n_routed_experts, cfg.n_activated_experts
  n_ep, axes = layout.ep_size, layout.ep_axes
  local = e // n_ep
  chex.assert_shape(counts, (e,))
  tokens = m // k

  counts_all = jax.lax.all_gather(counts, axes)                   # [sender, expert]
  me = jax.lax.axis_index(axes)
  per_pair = counts_all.reshape(n_ep, n_ep, local)                 # [sender, receiver, local expert]
  per_expert = per_pair.sum(0)                                     # [receiver, local expert]
  expert_start = _exclusive_cumsum(per_expert, 1)                  # where each expert's rows begin
  arrive_at = expert_start[None] + _exclusive_cumsum(per_pair, 0)  # [sender, receiver, local]: slice offsets
  sender_start = _exclusive_cumsum(counts_all, 1).reshape(n_ep, n_ep, local)  # in each sender's sorted rows

  fwd = dict(input_offsets=_exclusive_cumsum(counts, 0), send_sizes=counts,
             output_offsets=arrive_at[me].reshape(e), recv_sizes=per_pair[:, me].reshape(e))
  back = dict(input_offsets=arrive_at[:, me].reshape(e), send_sizes=per_pair[:, me].reshape(e),
              output_offsets=sender_start[:, me].reshape(e), recv_sizes=counts)
  group_sizes = per_expert[me]

  def run(capacity: int):
    pair_capacity = min(tokens * min(k, local), capacity)  # the most rows one device sends one peer
    send = functools.partial(ragged_exchange, how=exchange, axis_name=axes, n_peers=n_ep, capacity=pair_capacity)
    received = send(rows, jnp.zeros((capacity, d), rows.dtype), **fwd)
    out = grouped_swiglu(experts, received, group_sizes, impl)
    return send(out, jnp.zeros((m, d), out.dtype), **back)

  fast, worst = receive_bounds(tokens, cfg, n_ep, capacity_factor)
  if fast == worst:
    return run(worst)
  need = per_expert.sum(1).max()  # the most rows any device of this EP group receives
  if layout.other_axes:
    need = jax.lax.pmax(need, layout.other_axes)  # every device of the mesh takes the same branch
  return jax.lax.cond(need <= fast, lambda: run(fast), lambda: run(worst))


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, how: str, axis_name,
                    n_peers: int, capacity: int):
  """``jax.lax.ragged_all_to_all`` semantics; how="dense" runs it as ``dense_ragged_all_to_all``."""
  if how == "ragged":
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)
  return dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                 axis_name=axis_name, n_peers=n_peers, capacity=capacity)


def dense_ragged_all_to_all(operand: Float[Array, "n *f"], output: Float[Array, "m *f"],
                            input_offsets: Int[Array, "s"], send_sizes: Int[Array, "s"],
                            output_offsets: Int[Array, "s"], recv_sizes: Int[Array, "s"], *, axis_name,
                            n_peers: int, capacity: int) -> Float[Array, "m *f"]:
  """``ragged_all_to_all`` from ``all_to_all``: each peer gets a buffer of `capacity` rows holding the
  slices sent to it (concatenated) and, for each row, its offset in the peer's output.

  `capacity` must bound the rows sent to any one peer (rows beyond it would be lost): callers pass
  a bound that cannot be exceeded. recv_sizes is implied by the senders' sizes and not needed.
  """
  del recv_sizes
  slices = send_sizes.shape[0] // n_peers
  sizes = send_sizes.reshape(n_peers, slices)
  ends = jnp.cumsum(sizes, axis=1)
  starts = ends - sizes
  t = jnp.arange(capacity, dtype=sizes.dtype)
  slot = jax.vmap(lambda end: jnp.searchsorted(end, t, side="right"))(ends)  # [peer, row]: which slice
  used = t[None] < ends[:, -1:]
  slot = jnp.minimum(slot, slices - 1)
  within = t[None] - jnp.take_along_axis(starts, slot, 1)
  src = jnp.take_along_axis(input_offsets.reshape(n_peers, slices), slot, 1) + within
  dst = jnp.take_along_axis(output_offsets.reshape(n_peers, slices), slot, 1) + within
  dst = jnp.where(used, dst, output.shape[0])  # unused rows: past the end, dropped on arrival
  buf = operand[jnp.clip(src, 0, operand.shape[0] - 1)]
  buf = jnp.where(used.reshape(*used.shape, *(1,) * (operand.ndim - 1)), buf, 0)
  buf = jax.lax.all_to_all(buf.reshape(n_peers * capacity, *operand.shape[1:]), axis_name, 0, 0, tiled=True)
  dst = jax.lax.all_to_all(dst.reshape(n_peers * capacity), axis_name, 0, 0, tiled=True)
  return output.at[dst].set(buf, mode="drop")
