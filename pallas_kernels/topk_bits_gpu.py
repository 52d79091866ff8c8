"""Each row's top-k set as bits, straight from its logits (Pallas Triton): the mask a short prefill attends under.

A short prefill's official form applies each query's top-k set as a mask, and the masked-attention kernel
(``masked_mha_mgpu``) reads that mask as one bit a (query, key). Going there through indices -- the
top-k (``lax.top_k``'s sort for rows of at most 2k values, 0.75 ms for 2048 rows of 4K on an H100), a
scatter into booleans and a packing (0.40 ms) -- cost more than the indexer logits and the attention's
masking together. The bits need no indices: a value is in the set iff it is above the row's k-th
largest value, or equal to it and among the first of its ties. So, one program per row:

  1. v = the k-th largest value of the row's visible prefix, by bisection on order-preserving int32
     keys (``topk_gpu``'s search: a pass counts the keys >= a threshold); the search stops as soon as
     exactly k keys reach its threshold -- they are the top k, with no tie at the boundary. The row (at
     most ``block`` values) is loaded once: every pass runs on registers;
  2. one pass writes the row's words: bit j % 32 of word j // 32 is set iff key_j > v, or key_j == v and
     fewer than (k - #keys above v) ties come before j (ties to the lower index, ``lax.top_k``'s rule).
     A -inf value is never set (a row with fewer than k finite values keeps all of them).

Rows longer than a block are refused (``dispatch.topk_bits`` packs the top-k kernel's indices for them): a
version sweeping longer rows block by block from memory passed in interpret mode but gave different bits on an
H100 for rows of 20480 values (session 28), and a short prefill's official form never has such rows under the
defaults (``RunOptions.gathered_prefill_from``). On an H100, 2048 rows of 2049..4096 values: 0.18 ms, against
0.96 ms for the top-k's indices scattered and packed (BENCHMARKS.md).

The set equals ``dsv32_jax.indexer.select_topk``'s (``reference`` below packs its indices). Written, like
``topk_gpu``, with Pallas's Triton lowering: the ties' running count is a prefix sum over a block of the row, and
the packing a reshape and a sum, both plain there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from dsv32_jax.indexer import select_topk
from pallas_kernels.masked_mha_mgpu import WORD, index_bits
from pallas_kernels.topk_gpu import NEG_INF_KEY, kth_largest_key, next_pow2, ordered_key


@dataclasses.dataclass(frozen=True)
class TopkBitsConfig:
  block: int = 4096   # the most values a row may have (a power of two >= 32): the row is searched in registers
  num_warps: int = 4  # 4: 0.180 ms, 8: 0.195 ms for 2048 rows of <= 4096 values (H100)

  def __post_init__(self):
    if self.block < WORD or self.block & (self.block - 1):
      raise ValueError(f"TopkBitsConfig.block = {self.block}: expected a power of two >= {WORD}")

  def supports(self, t: int) -> bool:
    return t <= self.block


DEFAULT_CONFIG = TopkBitsConfig()


def words_per_row(t: int) -> int:
  return -(-t // WORD)


def reference(logits: Float[Array, "r t"], k: int, lengths: Int[Array, "r"] | None = None) -> Int[Array, "r tw"]:
  """``select_topk`` of each row (values past its length as -inf), its indices packed as bits."""
  t = logits.shape[1]
  if lengths is not None:
    logits = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], logits, -jnp.inf)
  return index_bits(select_topk(logits[None], min(k, t))[0], t)  # k >= t: every finite value


def topk_bits_gpu(logits: Float[Array, "r t"], k: int, lengths: Int[Array, "r"] | None = None,
                  config: TopkBitsConfig = DEFAULT_CONFIG, interpret: bool = False) -> Int[Array, "r tw"]:
  """Bit j % 32 of word [r, j // 32] is set iff key j is in row r's top k (ties to the lower index, never a
  -inf); ``lengths[r]``: the row's values past it count as -inf whatever they hold. int32 words, ceil(t / 32)
  a row."""
  r, t = logits.shape
  if k <= 0:
    raise ValueError(f"topk_bits_gpu: k = {k}, expected >= 1")
  if not config.supports(t):
    raise ValueError(f"topk_bits_gpu: rows of {t} values, at most TopkBitsConfig.block = {config.block} "
                     "(one block a row, searched in registers)")
  block = max(WORD, next_pow2(t))
  lengths = jnp.full((r,), t, jnp.int32) if lengths is None else jnp.clip(lengths, 0, t).astype(jnp.int32)
  rows = jnp.pad(logits, ((0, 0), (0, block - t))) if block != t else logits  # padding: past every length

  def kernel(lengths_ref, logits_ref, words_ref):
    row = pl.program_id(0)
    lane = jnp.arange(block, dtype=jnp.int32)
    values = logits_ref[row, pl.ds(0, block)]
    keys = ordered_key(jnp.where(lane < lengths_ref[row], values, -jnp.inf))  # -inf past the row's length

    def count(pred):
      return jnp.sum(pred(keys).astype(jnp.int32))

    # the k-th largest key; the search stops once exactly k keys reach its threshold (then they are the top k)
    v = kth_largest_key(lambda threshold: count(lambda keys: keys >= threshold), k, lambda c: c == k)
    tied = (keys == v).astype(jnp.int32)
    room = k - count(lambda keys: keys > v)  # ties at v taken in index order
    chosen = ((keys > v) | ((tied > 0) & (jnp.cumsum(tied) <= room))) & (keys > NEG_INF_KEY)
    bits = lax.shift_left(chosen.astype(jnp.int32), lane % WORD)  # distinct bits: their sum is their OR
    words_ref[row, pl.ds(0, block // WORD)] = jnp.sum(bits.reshape(block // WORD, WORD), axis=1)

  words = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, block // WORD), jnp.int32),
      grid=(r,),
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name="topk_bits_gpu",
  )(lengths, rows)
  return words[:, :words_per_row(t)]
