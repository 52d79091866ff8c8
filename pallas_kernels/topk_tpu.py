"""Exact top-k selection of indexer logits as a Pallas Mosaic TPU kernel (+ the approximate option).

Reference: :func:`dsv32_jax.indexer.select_topk`. The selection is used as a set, so only the set is
specified: the indices of the ``k`` largest logits of each row, ties at the k-th value going to the
lower key index (``jax.lax.top_k``'s rule, which the reference inherits), ``-1`` for the slots left
when fewer than ``k`` logits are finite (masked keys are ``-inf`` and never selected). Values are
ordered as ``jax.lax.top_k`` orders them, by the IEEE total order (``-0.0`` below ``+0.0``). The
kernel returns the set in ascending index order, ``-1`` last; the reference returns it by score.

Algorithm (a block of 8 rows x the whole row in VMEM; everything on the VPU, no sort):

1. Keys: each float32 logit becomes an int32 whose signed order is the float order
   (``bits`` for ``x >= 0``, ``bits ^ 0x7fffffff`` below).
2. Threshold: the k-th largest key, found bit by bit from the top by bisection -- 32 passes over the
   row, each a compare-and-count against one candidate per row (``count(key >= c) >= k``).
3. Compaction by lanes: a last pass takes every key above the threshold and, of the keys equal to it,
   the ``k - count(above)`` lowest-indexed ones (an exclusive prefix count of ties within each
   128-lane tile, on the MXU against a triangular 0/1 matrix). Each of the 128 lanes appends its
   taken indices to its own column of ``capacity`` slots, so no cross-lane scatter is needed. With
   k = 2048 a lane takes 16 keys on average (exactly 16 for a contiguous run); the default capacity
   48 is 8 standard deviations above: a uniformly random selection overflows some lane of a row
   with probability 3.5e-9 (Poisson tail x 128 lanes).
4. Outside the kernel the ``capacity * 128`` candidates per row (at most ``k`` of them real) are
   sorted and the first ``k`` kept; a row whose lanes overflowed is recomputed exactly by the
   reference (``jax.lax.cond`` over the whole call: correct always, slow only on adversarial
   selections such as every 128th key).

Cost: about 32 x 3 + 4 x capacity VPU operations per (8 x 128) tile of logits; the logits are read
from HBM once (docs/tpu.md has the roofline). ``topk_approx`` is ``jax.lax.approx_max_k``, whose TPU
implementation keeps the max of each of L bins and then sorts the bin maxima; docs/tpu.md gives its
recall.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.tpu_common import NUM_LANES, interpret_params, round_up

REFERENCE = "dsv32_jax.indexer.select_topk"

_INT_MIN = np.int32(-(2 ** 31))
_EMPTY = np.int32(2 ** 31 - 1)                           # an unused candidate slot (sorts last)
_NEG_INF_KEY = np.int32(np.float32(-np.inf).view(np.int32) ^ np.int32(0x7FFFFFFF))


@dataclasses.dataclass(frozen=True)
class TopkTpuConfig:
  """Tiling of the TPU top-k kernel.

  block_rows: rows per step (8 = one float32 vreg of sublanes).
  lane_capacity: candidate slots per lane and row; None picks ``m + ceil(7 sqrt(m)) + 4`` with
    ``m = ceil(k / 128)`` (48 for k = 2048).
  unroll: unrolling of the passes over a row's 128-lane tiles.
  """

  block_rows: int = 8
  lane_capacity: int | None = None
  unroll: int = 8
  vmem_limit_bytes: int = 48 * 1024 * 1024

  def capacity(self, k: int) -> int:
    if self.lane_capacity is not None:
      return self.lane_capacity
    m = -(-k // NUM_LANES)
    return m + math.ceil(7 * math.sqrt(m)) + 4


DEFAULT_CONFIG = TopkTpuConfig()


def _topk_kernel(logits_ref, candidates_ref, lane_counts_ref, keys_ref, *, k: int, capacity: int,
                 unroll: int):
  """logits_ref [R, T] f32 -> candidates_ref [R, capacity*128] i32 (unused slots _EMPTY) and
  lane_counts_ref [R, 128] i32 (keys each lane took; > capacity means overflow). keys_ref: scratch."""
  rows, t = logits_ref.shape
  n_tiles = t // NUM_LANES
  unroll = max(1, min(unroll, n_tiles))

  def tile(i):
    return pl.ds(pl.multiple_of(i * NUM_LANES, NUM_LANES), NUM_LANES)

  def to_keys(i, carry):
    bits = pltpu.bitcast(logits_ref[:, tile(i)], jnp.int32)
    keys_ref[:, tile(i)] = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return carry

  jax.lax.fori_loop(0, n_tiles, to_keys, 0, unroll=unroll)

  def count(predicate):
    """Per row, how many keys satisfy predicate (float32: exact below 2^24)."""
    def body(i, acc):
      return acc + predicate(keys_ref[:, tile(i)]).astype(jnp.float32)
    acc = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((rows, NUM_LANES), jnp.float32), unroll=unroll)
    return acc.sum(axis=1, keepdims=True)                            # [R, 1]

  def bisect(bit, answer):
    """answer holds the top bits of the k-th largest key, in the order where INT_MIN is 0."""
    trial = answer | jnp.left_shift(jnp.int32(1), 31 - bit)
    enough = count(lambda key: key >= (trial ^ _INT_MIN)) >= k
    return jnp.where(enough, trial, answer)

  threshold = jax.lax.fori_loop(0, 32, bisect, jnp.zeros((rows, 1), jnp.int32)) ^ _INT_MIN
  has_k_finite = threshold > _NEG_INF_KEY          # else: fewer than k finite logits, take them all
  floor = jnp.where(has_k_finite, threshold, _NEG_INF_KEY)
  n_above = count(lambda key: key > floor)
  ties_wanted = jnp.where(has_k_finite, k - n_above, 0.0)           # [R, 1], float32

  candidates_ref[...] = jnp.full(candidates_ref.shape, _EMPTY, jnp.int32)
  lane = jax.lax.broadcasted_iota(jnp.int32, (rows, NUM_LANES), 1)
  strictly_before = (jax.lax.broadcasted_iota(jnp.int32, (NUM_LANES, NUM_LANES), 0)
                     < jax.lax.broadcasted_iota(jnp.int32, (NUM_LANES, NUM_LANES), 1)).astype(jnp.bfloat16)

  def compact(i, carry):
    lane_counts, ties_seen = carry                                   # [R, 128] i32, [R, 1] f32
    key = keys_ref[:, tile(i)]
    tie = (key == floor).astype(jnp.float32)
    ties_before = ties_seen + jnp.dot(tie.astype(jnp.bfloat16), strictly_before,
                                      preferred_element_type=jnp.float32)
    take = (key > floor) | ((tie > 0) & (ties_before < ties_wanted))
    level = jnp.where(take, lane_counts, -1)
    index = i * NUM_LANES + lane
    for c in range(capacity):
      slots = pl.ds(c * NUM_LANES, NUM_LANES)
      candidates_ref[:, slots] = jnp.where(level == c, index, candidates_ref[:, slots])
    return lane_counts + take.astype(jnp.int32), ties_seen + tie.sum(axis=1, keepdims=True)

  lane_counts, _ = jax.lax.fori_loop(
      0, n_tiles, compact, (jnp.zeros((rows, NUM_LANES), jnp.int32), jnp.zeros((rows, 1), jnp.float32)))
  lane_counts_ref[...] = lane_counts


def _pad_logits(logits, k, block_rows):
  """[N, T] -> [N', T'] with -inf rows/columns: N' a multiple of block_rows, T' of 128 and >= k."""
  n, t = logits.shape
  t_pad = max(round_up(t, NUM_LANES), round_up(k, NUM_LANES))
  n_pad = round_up(n, block_rows)
  if (n_pad, t_pad) != (n, t):
    logits = jnp.pad(logits, ((0, n_pad - n), (0, t_pad - t)), constant_values=-jnp.inf)
  return logits


def _reference_rows(logits: Float[Array, "n t"], k: int) -> Int[Array, "n k"]:
  from dsv32_jax.indexer import select_topk
  return select_topk(logits[None], k)[0]


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def topk(logits: Float[Array, "*b t"], k: int, *, config: TopkTpuConfig = DEFAULT_CONFIG,
         interpret=None) -> Int[Array, "*b k"]:
  """The k largest logits of each row as a set of indices (ascending, -1 padded); exact."""
  *lead, t = logits.shape
  rows = math.prod(lead)
  capacity = config.capacity(k)
  flat = _pad_logits(logits.reshape(rows, t).astype(jnp.float32), k, config.block_rows)
  n_pad, t_pad = flat.shape
  r = config.block_rows
  kernel = functools.partial(_topk_kernel, k=k, capacity=capacity, unroll=config.unroll)
  candidates, lane_counts = pl.pallas_call(
      kernel,
      grid=(n_pad // r,),
      in_specs=[pl.BlockSpec((r, t_pad), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((r, capacity * NUM_LANES), lambda i: (i, 0)),
                 pl.BlockSpec((r, NUM_LANES), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((n_pad, capacity * NUM_LANES), jnp.int32),
                 jax.ShapeDtypeStruct((n_pad, NUM_LANES), jnp.int32)],
      scratch_shapes=[pltpu.VMEM((r, t_pad), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                           vmem_limit_bytes=config.vmem_limit_bytes),
      interpret=interpret_params(interpret),
      name="dsa_topk",
  )(flat)
  selected = jnp.sort(candidates, axis=-1)[:, :k]
  selected = jnp.where(selected == _EMPTY, -1, selected)
  overflow = jnp.any(lane_counts > capacity)
  selected = jax.lax.cond(overflow, lambda: _reference_rows(flat, k), lambda: selected)
  return selected[:rows].reshape(*lead, k)


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def topk_approx(logits: Float[Array, "*b t"], k: int, *, recall_target: float = 0.95) -> Int[Array, "*b k"]:
  """``jax.lax.approx_max_k`` with the -1 rule: on a TPU it keeps the max of each of L bins
  (L from recall_target) and sorts those, so ties and near-threshold keys may be dropped; on other
  backends it is exact (XLA's fallback sorts). Recall figures: docs/tpu.md."""
  *lead, t = logits.shape
  flat = logits.reshape(-1, t).astype(jnp.float32)
  if t < k:
    flat = jnp.pad(flat, ((0, 0), (0, k - t)), constant_values=-jnp.inf)
  values, idx = jax.lax.approx_max_k(flat, k, recall_target=recall_target)
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32).reshape(*lead, k)
