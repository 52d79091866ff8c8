"""Exact top-k of long rows on GPU: threshold search and stream compaction, one program per row.

Written with Pallas's Triton lowering, not Mosaic GPU: stream compaction needs a scatter of each
kept element to a run-time offset (a prefix sum of the keep mask), and Mosaic GPU's Pallas front end
has no per-element scatter into shared or global memory in its warpgroup array model; Triton has
masked scatter stores and block prefix sums.

Per row (``jax.lax.top_k`` sorts the whole row, 19 ms for 2048 x 131072 on an H100):

  0. the maximum of each segment of g values of the row's visible prefix, g per row: the largest
     power of two leaving at least 4k segments (g = 1 below 8k visible values, 16 at 128K, k = 2048);
  1. tau = the k-th largest segment maximum, by bisection on order-preserving int32 keys (a bit per
     pass over the maxima; ``search_bits`` 2 or 4 settle more per pass against several thresholds at
     once). At least k values are >= tau, and every value of the row's top k is (a value above the
     k-th largest v lies in a segment whose maximum is above v; fewer than k such segments exist).
     Any lower tau that at least k maxima reach serves as well, only keeping more candidates: the
     search stops once at most k + k/8 maxima reach it (``stop_early``; ~half the 32 passes);
  2. one pass over the row keeps the finite values >= tau, in index order, as candidates (random
     rows keep ~1.13k; a row with more than the capacity -- at worst k * segment, or more when segment
     maxima tie at tau -- makes the whole batch fall back to ``lax.top_k``: exact for every input);
  3. v = the k-th largest candidate (the same search, ``search_bits`` a pass; it stops early once
     exactly k candidates reach its threshold: they are the top k, with no tie at the boundary), then
     every candidate above v and the lowest-indexed candidates equal to v until k are chosen, written
     in index order; slots left over (a row with fewer than k finite values) hold -1.

The result equals ``dsv32_jax.indexer.select_topk``: the same set, ties to the lower index, and -1
for slots whose value is -inf (fewer than k visible keys).

One program per row leaves most of the GPU idle at decode (batch 1: one program over 128K values).
``TopkGpuConfig.row_parts`` splits each row into parts of at least 4k values, takes every part's
top-k in parallel and then the top-k of their union (exact, same tie rule). Measured on an H200 at
128K it loses at decode batch 1 and 32 (1.3x slower: the second pass and launch cost more than the
parallelism gains) and wins 6% at batch 128, so it is off by default (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from dsv32_jax.indexer import select_topk as reference

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
NEG_INF_KEY = -(2 ** 31) + 0x7FFFFF  # ordered_key(-inf): bits 0xFF800000 ^ 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class TopkGpuConfig:
  capacity: int | None = None   # candidates kept per row; None: 2k (random rows keep ~1.13k); a row with
                                # more makes the batch fall back to lax.top_k, exactly
  block: int = 2048             # values per step of each pass over a row
  num_warps: int = 4
  num_stages: int = 1           # Triton software pipelining of the passes' loads
  search_bits: int = 1          # bits settled per pass of the threshold searches (steps 1 and 3; 1, 2 or 4:
                                # 32, 16 or 8 passes, each counting against 2**bits thresholds at once)
  stop_early: bool = True       # the 1-bit searches stop once their threshold will do (see the module); False:
                                # all 32 passes (for comparison)
  row_parts: int | None = 1     # programs per row (decode: few rows, long ones); None: enough to fill
                                # the GPU. >1: each part's exact top-k, then the top-k of their union

  def __post_init__(self):
    if self.search_bits not in (1, 2, 4):
      raise ValueError(f"TopkGpuConfig.search_bits = {self.search_bits}: expected 1, 2 or 4")


# Measured on an H100 at 128K (BENCHMARKS.md, top-k tilings): 2048 values a step and 4 warps are best for
# prefill chunks (2048 rows: 1.79 ms causal, 8 warps 2.3); 8192 and 16 warps for a decode step of a few
# sequences (one long row each: fewer, longer steps).
PREFILL_CONFIG = TopkGpuConfig(block=2048, num_warps=4)
DECODE_CONFIG = TopkGpuConfig(block=8192, num_warps=16)
DECODE_ROWS = 8  # at most this many rows take DECODE_CONFIG when no config is given


SEGMENTS = (1, 2, 4, 8, 16, 32, 64)  # per-row segment sizes: the largest leaving >= 4k maxima
ROW_ALIGN = 256                      # rows are padded to a multiple of this (blocks >= the largest segment)


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def ordered_key(x: Float[Array, "..."]) -> Int[Array, "..."]:
  """int32 keys in the order of the float32 values (-0.0 < +0.0; -inf smallest)."""
  bits = lax.bitcast_convert_type(x, jnp.int32)
  return bits ^ ((bits >> 31) & INT32_MAX)


def kth_largest_key(count_at_least, k: int, enough=None) -> Int[Array, ""]:
  """The largest key t with count(keys >= t) >= k: the k-th largest key.

  Built bit by bit from the most significant bit of the unsigned key order (u = key ^ INT32_MIN), so
  no bound ever overflows: 32 counting passes (``count_at_least(t)`` counts the keys >= t).

  ``enough(count)``: stop as soon as the answer so far -- always a key with count(keys >= it) >= k, so
  at most the k-th largest -- has a count for which this holds (a run-time loop, often half the passes).
  """
  if enough is None:
    answer_u = jnp.int32(0)
    for bit in range(31, -1, -1):
      candidate_u = answer_u | jnp.int32(INT32_MIN if bit == 31 else 1 << bit)
      answer_u = jnp.where(count_at_least(candidate_u ^ INT32_MIN) >= k, candidate_u, answer_u)
    return answer_u ^ INT32_MIN

  def settle_bit(carry):
    bit, answer_u, count = carry
    candidate_u = answer_u | lax.shift_left(jnp.int32(1), bit)  # bit 31: INT32_MIN
    c = count_at_least(candidate_u ^ INT32_MIN)
    return bit - 1, jnp.where(c >= k, candidate_u, answer_u), jnp.where(c >= k, c, count)

  def searching(carry):
    bit, _, count = carry
    return (bit >= 0) & jnp.logical_not(enough(count))

  # count starts unknown (INT32_MAX: "all of them"); the answer u = 0 is the smallest key
  _, answer_u, _ = lax.while_loop(searching, settle_bit, (jnp.int32(31), jnp.int32(0), jnp.int32(INT32_MAX)))
  return answer_u ^ INT32_MIN


def _kth_largest_key_by_digits(count_at_least_each, k: int, bits: int) -> Int[Array, ""]:
  """``kth_largest_key`` settling `bits` bits a pass: 32 / bits passes, each counting the keys >= each
  of 2**bits thresholds (the current answer with every value of the next digit) in one sweep.

  ``count_at_least_each(thresholds)`` -> counts [2**bits]; they do not grow with the digit, so the digit
  is the number of thresholds still reaching k, less one (at least 0: fewer than k keys in all).
  """
  digits = jnp.arange(1 << bits, dtype=jnp.int32)
  answer_u = jnp.int32(0)
  for shift in range(32 - bits, -1, -bits):
    counts = count_at_least_each((answer_u | (digits << shift)) ^ INT32_MIN)
    digit = jnp.maximum(jnp.sum((counts >= k).astype(jnp.int32)) - 1, 0)
    answer_u = answer_u | (digit << shift)
  return answer_u ^ INT32_MIN


def segment_log2(lengths: Int[Array, "r"], k: int) -> Int[Array, "r"]:
  """log2 of each row's segment size: the largest in SEGMENTS with at least 4k segments in the row."""
  ratio = jnp.maximum(lengths, 1) // (4 * k)
  log2 = jnp.where(ratio > 0, 31 - lax.clz(jnp.maximum(ratio, 1)), 0)
  return jnp.clip(log2, 0, len(SEGMENTS) - 1).astype(jnp.int32)


def topk_gpu(logits: Float[Array, "r t"], k: int, lengths: Int[Array, "r"] | None = None,
             config: TopkGpuConfig | None = None, interpret: bool = False) -> Int[Array, "r k"]:
  """Indices of the k largest values of each row (ties to the lower index), -1 where the value is -inf.

  ``lengths[r]``: the row's values past it count as -inf whatever they hold (a causal or decode row:
  position + 1; the indexer-logits kernel may leave them unwritten); the kernel masks them where its last
  block reads past a length, and the reference paths below mask them. Default: the whole row. config: None takes DECODE_CONFIG for at most
  DECODE_ROWS rows, PREFILL_CONFIG otherwise.
  """
  r, t = logits.shape
  config = config or (DECODE_CONFIG if r <= DECODE_ROWS else PREFILL_CONFIG)
  lengths = jnp.full((r,), t, jnp.int32) if lengths is None else jnp.minimum(lengths, t)

  def masked_reference():  # lax.top_k over the rows with -inf past their lengths
    return reference(jnp.where(jnp.arange(t)[None, :] < lengths[:, None], logits, -jnp.inf), k)

  if t <= 2 * k:
    return masked_reference()  # short rows: pruning saves nothing
  parts = _row_parts(config, r, t, k)
  if parts > 1:
    return _topk_by_parts(logits, k, lengths, parts, config, interpret)
  rows = logits
  if t % ROW_ALIGN:  # whole blocks of at least the largest segment (the padding is never read: lengths <= t)
    rows = jnp.pad(logits, ((0, 0), (0, ROW_ALIGN - t % ROW_ALIGN)), constant_values=-jnp.inf)
  idx, overflow = topk_candidates_kernel(rows, lengths, k, config, interpret)
  return lax.cond(jnp.any(overflow > 0), masked_reference, lambda: idx)


NUM_SMS = 132  # H100 / H200 SXM


def _row_parts(config: TopkGpuConfig, rows: int, t: int, k: int) -> int:
  most = max(1, t // (4 * k))  # parts of at least 4k values: a part's top-k still prunes
  if config.row_parts is None:
    return min(most, max(1, 2 * NUM_SMS // rows))
  return max(1, min(config.row_parts, most))


def _topk_by_parts(logits: Float[Array, "r t"], k: int, lengths: Int[Array, "r"], parts: int,
                   config: TopkGpuConfig, interpret: bool) -> Int[Array, "r k"]:
  """The top-k of each row as the top-k of its parts' top-k sets, so that few rows fill the GPU.

  Exact, with the same tie rule: the row's top k lie among its parts' top k, and equal values keep
  their index order through both stages (parts in row order; inside a part, candidates of equal value
  in index order), so ties still go to the lower index.
  """
  r, t = logits.shape
  part = -(-t // parts)
  part = -(-part // ROW_ALIGN) * ROW_ALIGN
  padded = jnp.pad(logits, ((0, 0), (0, part * parts - t)), constant_values=-jnp.inf)
  starts = jnp.arange(parts, dtype=jnp.int32) * part
  part_lengths = jnp.clip(lengths[:, None] - starts[None, :], 0, part).reshape(-1)
  one_part = dataclasses.replace(config, row_parts=1)
  local = topk_gpu(padded.reshape(r * parts, part), k, part_lengths, one_part, interpret).reshape(r, parts, k)
  candidates = jnp.where(local >= 0, local + starts[None, :, None], -1).reshape(r, parts * k)
  values = jnp.where(candidates >= 0, jnp.take_along_axis(padded, jnp.maximum(candidates, 0), axis=1), -jnp.inf)
  chosen = topk_gpu(values, k, None, one_part, interpret)
  return jnp.where(chosen >= 0, jnp.take_along_axis(candidates, jnp.maximum(chosen, 0), axis=1), -1)


def topk_candidates_kernel(logits: Float[Array, "r t"], lengths: Int[Array, "r"], k: int, config: TopkGpuConfig,
                           interpret: bool = False) -> tuple[Int[Array, "r k"], Int[Array, "r"]]:
  """The kernel alone: (indices, overflow flag per row); a flagged row's indices are not valid."""
  r, t = logits.shape
  capacity = next_pow2(config.capacity or 2 * k)
  k_pow2 = next_pow2(k)
  block = min(config.block, t & -t)  # a power of two dividing t: every block is whole
  if block < SEGMENTS[-1]:
    raise ValueError(f"topk_candidates_kernel: row length {t} must be a multiple of {SEGMENTS[-1]}")
  max_width = 8 * k + block          # maxima per row: fewer than 8k (see segment_log2)
  seg_log2 = segment_log2(jnp.clip(lengths, 0, t), k)

  # SPARE: masked-off lanes of a scatter get distinct destinations past the live region. Hardware
  # skips them; interpret mode writes their old values back, which must not land on live slots.
  def kernel(lengths_ref, seg_log2_ref, logits_ref, idx_ref, overflow_ref, maxima_ref, cand_val_ref, cand_idx_ref):
    row = pl.program_id(0)
    n = jnp.clip(lengths_ref[row], 0, t)
    level = seg_log2_ref[row]
    lane = jnp.arange(block, dtype=jnp.int32)

    def row_block(b):
      offs = b * block + lane
      return offs, jnp.where(offs < n, logits_ref[row, pl.ds(b * block, block)], -jnp.inf)

    def segment_maxima(b, carry):  # step 0: maxima of this row's segments, in a scratch row
      _, vals = row_block(b)
      for i, g in enumerate(SEGMENTS):
        @pl.when(level == i)
        def _(g=g):
          m = vals.reshape(block // g, g).max(axis=1) if g > 1 else vals
          maxima_ref[row, pl.ds(b * (block // g), block // g)] = m
      return carry

    n_blocks = (n + block - 1) // block
    lax.fori_loop(0, n_blocks, segment_maxima, jnp.int32(0))
    n_max = (n + (1 << level) - 1) >> level

    def sweep_maxima(count, init):  # init + count(keys) summed over the maxima's blocks
      def body(b, c):
        offs = b * block + lane
        return c + count(jnp.where(offs < n_max, ordered_key(maxima_ref[row, pl.ds(b * block, block)]), INT32_MIN))
      return lax.fori_loop(0, (n_max + block - 1) // block, body, init)

    def count_maxima_at_least(threshold):
      return sweep_maxima(lambda keys: jnp.sum((keys >= threshold).astype(jnp.int32)), jnp.int32(0))

    def count_maxima_at_least_each(thresholds):  # [2**bits] counts in one sweep over the maxima
      return sweep_maxima(lambda keys: jnp.sum((keys[None, :] >= thresholds[:, None]).astype(jnp.int32), axis=1),
                          jnp.zeros(thresholds.shape, jnp.int32))

    if config.search_bits == 1:  # early stop: at most k/8 more maxima reach tau than the exact k-th largest
      tau = kth_largest_key(count_maxima_at_least, k, (lambda c: c <= k + k // 8) if config.stop_early else None)
    else:
      tau = _kth_largest_key_by_digits(count_maxima_at_least_each, k, config.search_bits)

    def compact(b, count):  # candidates >= tau, in index order
      offs, vals = row_block(b)
      keys = ordered_key(vals)
      keep = (keys >= tau) & (keys > NEG_INF_KEY)  # -inf keys are never chosen: their slots stay -1
      dest = count + jnp.cumsum(keep.astype(jnp.int32)) - 1
      ok = keep & (dest < capacity)
      dest = jnp.where(ok, dest, capacity + lane)  # see SPARE
      pltriton.store(cand_val_ref.at[row, dest], vals, mask=ok)
      pltriton.store(cand_idx_ref.at[row, dest], offs, mask=ok)
      return count + jnp.sum(keep.astype(jnp.int32))

    count = lax.fori_loop(0, n_blocks, compact, jnp.int32(0))
    overflow_ref[row] = (count > capacity).astype(jnp.int32)

    out_slot = jnp.arange(k_pow2, dtype=jnp.int32)
    pltriton.store(idx_ref.at[row, out_slot], jnp.full((k_pow2,), -1, jnp.int32), mask=out_slot < k)

    slot = jnp.arange(capacity, dtype=jnp.int32)
    used = slot < jnp.minimum(count, capacity)
    vals = pltriton.load(cand_val_ref.at[row, pl.ds(0, capacity)], mask=used, other=-jnp.inf)
    keys = jnp.where(used, ordered_key(vals), INT32_MIN)
    cand_idx = pltriton.load(cand_idx_ref.at[row, pl.ds(0, capacity)], mask=used, other=-1)
    if config.search_bits == 1:
      v = kth_largest_key(lambda threshold: jnp.sum((keys >= threshold).astype(jnp.int32)), k,
                           (lambda c: c == k) if config.stop_early else None)  # exactly k reach v: the top k
    else:
      v = _kth_largest_key_by_digits(
          lambda thresholds: jnp.sum((keys[None, :] >= thresholds[:, None]).astype(jnp.int32), axis=1), k,
          config.search_bits)
    above = used & (keys > v)
    tied = used & (keys == v)
    room = k - jnp.sum(above.astype(jnp.int32))
    chosen = above | (tied & (jnp.cumsum(tied.astype(jnp.int32)) <= room))
    dest = jnp.where(chosen, jnp.cumsum(chosen.astype(jnp.int32)) - 1, k_pow2 + slot)
    pltriton.store(idx_ref.at[row, dest], cand_idx, mask=chosen)

  idx, overflow = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((r, k_pow2 + capacity), jnp.int32), jax.ShapeDtypeStruct((r,), jnp.int32),
                 jax.ShapeDtypeStruct((r, max_width), jnp.float32),
                 jax.ShapeDtypeStruct((r, capacity + block), jnp.float32),
                 jax.ShapeDtypeStruct((r, capacity + block), jnp.int32)),
      grid=(r,),
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="topk_gpu",
  )(lengths.astype(jnp.int32), seg_log2, logits)[:2]
  return idx[:, :k], overflow
