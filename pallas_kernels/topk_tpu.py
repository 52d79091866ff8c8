"""Exact top-k selection of indexer logits as a Pallas Mosaic TPU kernel (+ the approximate option).

Reference: :func:`dsv32_jax.indexer.select_topk`. The selection is used as a set, so only the set is
specified: the indices of the ``k`` largest logits of each row, ties at the k-th value going to the
lower key index (``jax.lax.top_k``'s rule, which the reference inherits), ``-1`` for the slots left
when fewer than ``k`` logits are finite (masked keys are ``-inf`` and never selected). Values are
ordered as ``jax.lax.top_k`` orders them, by the IEEE total order (``-0.0`` below ``+0.0``). The
kernel returns the set in ascending index order, ``-1`` last; the reference returns it by score.

Algorithm (a block of 8 rows x the whole row in VMEM; on the VPU, no sort):

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

Optional per-row ``lengths`` make the keys past a row's prefix count as -inf and stop every pass at
the block's longest prefix (a causal prefill does half the work).

Cost: about 32 x 3 + 2 x capacity + 15 VPU operations per (8 x 128) tile of logits (~207 at
k = 2048); the logits are read from HBM once (docs/tpu.md has the roofline). ``topk_approx`` is ``jax.lax.approx_max_k``, whose TPU
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


def _topk_kernel(tiles_ref, lengths_ref, logits_ref, candidates_ref, lane_counts_ref, keys_ref, *, k: int,
                 capacity: int, unroll: int):
  """One block of R rows. tiles_ref [blocks] (SMEM prefetch): 128-lane tiles holding the block's
  longest valid prefix (the passes stop there); lengths_ref [R, 1] i32: valid prefix of each row
  (keys past it count as -inf); logits_ref [R, T] f32 -> candidates_ref [R, capacity*128] i32
  (unused slots _EMPTY) and lane_counts_ref [R, 128] i32 (keys each lane took; > capacity means
  overflow). keys_ref: scratch [R, T] i32."""
  rows = logits_ref.shape[0]
  n_tiles = tiles_ref[pl.program_id(0)]

  def tile(i):
    return pl.ds(pl.multiple_of(i * NUM_LANES, NUM_LANES), NUM_LANES)

  def over_tiles(body, carry):
    """carry = body(i, carry) for the block's tiles, `unroll` tiles per loop iteration."""
    def group(g, carry):
      for u in range(unroll):
        carry = body(g * unroll + u, carry)
      return carry
    carry = jax.lax.fori_loop(0, n_tiles // unroll, group, carry)
    return jax.lax.fori_loop(n_tiles // unroll * unroll, n_tiles, body, carry)

  lane = jax.lax.broadcasted_iota(jnp.int32, (rows, NUM_LANES), 1)
  lengths = lengths_ref[...]

  def to_keys(i, carry):
    bits = pltpu.bitcast(logits_ref[:, tile(i)], jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    keys_ref[:, tile(i)] = jnp.where(i * NUM_LANES + lane < lengths, key, _NEG_INF_KEY)
    return carry

  over_tiles(to_keys, 0)

  def count(predicate):
    """Per row, how many keys satisfy predicate (float32: exact below 2^24)."""
    def body(i, acc):
      return acc + predicate(keys_ref[:, tile(i)]).astype(jnp.float32)
    return over_tiles(body, jnp.zeros((rows, NUM_LANES), jnp.float32)).sum(axis=1, keepdims=True)  # [R, 1]

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


def topk_candidates(logits: Float[Array, "n t"], lengths: Int[Array, "n"], k: int, config: TopkTpuConfig,
                    interpret=None) -> tuple[Int[Array, "n c"], Int[Array, "n l"]]:
  """The kernel alone on padded rows (``n`` a multiple of block_rows, ``t`` of 128, ``t >= k``):
  per row ``capacity * 128`` candidate indices (_EMPTY unused) and the keys each lane took."""
  n, t = logits.shape
  r, capacity = config.block_rows, config.capacity(k)
  tiles = jnp.maximum(lengths.reshape(n // r, r).max(axis=1), 0)
  tiles = ((tiles + NUM_LANES - 1) // NUM_LANES).astype(jnp.int32)
  kernel = functools.partial(_topk_kernel, k=k, capacity=capacity, unroll=config.unroll)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(n // r,),
          in_specs=[pl.BlockSpec((r, 1), lambda i, tl: (i, 0)), pl.BlockSpec((r, t), lambda i, tl: (i, 0))],
          out_specs=[pl.BlockSpec((r, capacity * NUM_LANES), lambda i, tl: (i, 0)),
                     pl.BlockSpec((r, NUM_LANES), lambda i, tl: (i, 0))],
          scratch_shapes=[pltpu.VMEM((r, t), jnp.int32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((n, capacity * NUM_LANES), jnp.int32),
                 jax.ShapeDtypeStruct((n, NUM_LANES), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                           vmem_limit_bytes=config.vmem_limit_bytes),
      interpret=interpret_params(interpret),
      name="dsa_topk",
  )(tiles, lengths.reshape(n, 1).astype(jnp.int32), logits)


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def topk(logits: Float[Array, "*b t"], k: int, lengths: Int[Array, "*b"] | None = None, *,
         config: TopkTpuConfig = DEFAULT_CONFIG, interpret=None) -> Int[Array, "*b k"]:
  """The k largest logits of each row as a set of indices (ascending, -1 padded); exact.

  ``lengths`` (optional): each row's valid prefix; keys at or past it count as -inf and the
  kernel's passes stop at the block's longest prefix (a causal prefill halves the work).
  """
  *lead, t = logits.shape
  rows = math.prod(lead)
  flat = _pad_logits(logits.reshape(rows, t).astype(jnp.float32), k, config.block_rows)
  n_pad = flat.shape[0]
  lengths = (jnp.full((rows,), t, jnp.int32) if lengths is None
             else jnp.clip(lengths.reshape(rows).astype(jnp.int32), 0, t))
  lengths = jnp.pad(lengths, (0, n_pad - rows))
  candidates, lane_counts = topk_candidates(flat, lengths, k, config, interpret)
  selected = jnp.sort(candidates, axis=-1)[:, :k]
  selected = jnp.where(selected == _EMPTY, -1, selected)
  overflow = jnp.any(lane_counts > config.capacity(k))

  def exact_reference():
    visible = jnp.arange(flat.shape[1])[None, :] < lengths[:, None]
    return _reference_rows(jnp.where(visible, flat, -jnp.inf), k)

  selected = jax.lax.cond(overflow, exact_reference, lambda: selected)
  return selected[:rows].reshape(*lead, k)


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def topk_approx(logits: Float[Array, "*b t"], k: int, lengths: Int[Array, "*b"] | None = None, *,
                recall_target: float = 0.95) -> Int[Array, "*b k"]:
  """``jax.lax.approx_max_k`` with the -1 rule: on a TPU it keeps the max of each of L bins
  (L from recall_target) and sorts those, so ties and near-threshold keys may be dropped; on other
  backends it is exact (XLA's fallback sorts). Recall figures: docs/tpu.md."""
  *lead, t = logits.shape
  flat = logits.reshape(-1, t).astype(jnp.float32)
  if lengths is not None:
    flat = jnp.where(jnp.arange(t)[None, :] < lengths.reshape(-1, 1), flat, -jnp.inf)
  if t < k:
    flat = jnp.pad(flat, ((0, 0), (0, k - t)), constant_values=-jnp.inf)
  values, idx = jax.lax.approx_max_k(flat, k, recall_target=recall_target)
  return jnp.where(values == -jnp.inf, -1, idx).astype(jnp.int32).reshape(*lead, k)
