"""Sparse MLA attention fetching whole 64-token blocks, as a Pallas Mosaic TPU kernel.

Reference: :func:`dsv32_jax.mla.sparse_attention_scaled` -- the result is the same token set's
attention: this is an exact variant of :mod:`pallas_kernels.sparse_mla_tpu`, not block-sparse
attention. What changes is how the selected latent rows reach VMEM.

The token-granular kernel issues two DMAs per selected token (1 KiB of latent + 128 B of ``k_pe``
in bf16): 4096 descriptors for a 2048-token query, all issued by the scalar core. Here the selected
token indices of a query are grouped by the ``block_tokens``-token block that holds them (64, the
page size of the serving stacks' latent caches); each distinct block is fetched by one DMA per part
(64 x 1 KiB = 64 KiB of latent), and a per-block 64-bit membership mask keeps exactly the selected
tokens in the softmax. The work is proportional to the number of distinct blocks: between
``k / 64`` (the selection falls in whole blocks: 32 DMAs instead of 2048, same MXU work) and ``k``
(every token in its own block: 64x the MXU work of the token kernel). Which of the two kernels wins
depends on how clustered DSA's selections are and on the TPU's DMA issue cost, both still to be
measured (docs/tpu.md).

Preparation (XLA, outside the kernel, O(k log k) per query): the distinct blocks of each query in
ascending order and their membership masks, one int32 table row per query
``[block ids (k) | mask words (2k)]``, unused slots last. The kernel copies a query's row HBM -> SMEM by
DMA, double-buffered across the (sequential) grid steps, fetches ``blocks_per_chunk`` blocks per
compute step into a double buffer (the next chunk's DMAs are issued before this chunk is computed),
and runs the same online softmax as the token kernel. Indices must be distinct (top-k's are) and in
``[0, T)``; the last block of a sequence whose length is not a multiple of ``block_tokens`` is fetched
shifted back to end at ``T``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels import sparse_mla_tpu
from pallas_kernels.tpu_common import interpret_params

REFERENCE = "dsv32_jax.mla.sparse_attention_scaled"

_NO_BLOCK = 2 ** 30


@dataclasses.dataclass(frozen=True)
class SparseMlaBlocksTpuConfig:
  """Tiling of the block-granular sparse MLA kernel.

  block_tokens: tokens per fetched block (a power of two, at most 64: one mask bit per token in two
    int32 words).
  blocks_per_chunk: blocks per compute step: ``blocks_per_chunk * block_tokens`` keys per MXU pass
    (128 by default), two chunks resident.
  """

  block_tokens: int = 64
  blocks_per_chunk: int = 2
  vmem_limit_bytes: int = 32 * 1024 * 1024

  def __post_init__(self):
    bt = self.block_tokens
    if bt < 1 or bt > 64 or bt & (bt - 1):
      raise ValueError(f"block_tokens = {bt}: expected a power of two up to 64")


DEFAULT_CONFIG = SparseMlaBlocksTpuConfig()


def block_table(idx: Int[Array, "n k"], block_tokens: int) -> tuple[Int[Array, "n k3"], Int[Array, "n"]]:
  """Per query: ``[distinct block ids ascending (k) | 2 mask words per block (2k)]`` and the count.

  Bit ``o`` of a block's mask (word ``o // 32``, bit ``o % 32``) is set when token
  ``block * block_tokens + o`` is selected. Slots past the count hold block 0 with an empty mask.
  """
  n, k = idx.shape
  valid = idx >= 0
  block = jnp.where(valid, idx // block_tokens, _NO_BLOCK)
  ordered = jnp.sort(block, axis=-1)
  previous = jnp.concatenate([jnp.full((n, 1), -1, ordered.dtype), ordered[:, :-1]], axis=-1)
  first = (ordered != previous) & (ordered != _NO_BLOCK)
  n_blocks = first.sum(axis=-1).astype(jnp.int32)
  distinct = jnp.sort(jnp.where(first, ordered, _NO_BLOCK), axis=-1)
  slot = jax.vmap(jnp.searchsorted)(distinct, block)                   # each index's block slot
  offset = jnp.where(valid, idx % block_tokens, 0)
  bit = jnp.where(valid, jnp.left_shift(jnp.int32(1), offset % 32), 0)  # distinct bits: add == or
  word = 2 * jnp.minimum(slot, k - 1) + offset // 32
  masks = jax.vmap(lambda w, v: jnp.zeros((2 * k,), jnp.int32).at[w].add(v))(word, bit)
  distinct = jnp.where(distinct == _NO_BLOCK, 0, distinct)
  return jnp.concatenate([distinct, masks], axis=-1).astype(jnp.int32), n_blocks


def _sparse_mla_blocks_kernel(n_blocks_ref, q_lat_ref, q_pe_ref, table_hbm_ref, kv_hbm_ref, pe_hbm_ref,
                              out_ref, table_smem, kv_buf, pe_buf, table_sem, block_sems, *,
                              queries_per_seq: int, keys_per_seq: int, slots: int, block_tokens: int,
                              blocks_per_chunk: int, scale: float):
  """Step n = one query. n_blocks_ref [N] (SMEM prefetch); q_lat_ref [H, C], q_pe_ref [H, R];
  table_hbm_ref [N, 3k], kv_hbm_ref [B*T, C], pe_hbm_ref [B*T, R] (HBM); out_ref [H, C];
  scratch: table_smem [2, 3k], kv_buf [2, G*bt, C], pe_buf [2, G*bt, R], DMA semaphores."""
  n = pl.program_id(0)
  slot = n % 2
  bt, g_count = block_tokens, blocks_per_chunk
  chunk = bt * g_count

  def table_copy(row, s):
    return pltpu.make_async_copy(table_hbm_ref.at[pl.ds(row, 1)], table_smem.at[pl.ds(s, 1)], table_sem.at[s])

  @pl.when(n == 0)
  def _first_table_row():
    table_copy(0, 0).start()

  @pl.when(n + 1 < pl.num_programs(0))
  def _prefetch_next_table_row():
    table_copy(n + 1, 1 - slot).start()

  table_copy(n, slot).wait()
  seq_base = (n // queries_per_seq) * keys_per_seq

  def block_start(j):
    """First row fetched for block slot j (shifted back so the block ends inside the sequence)."""
    return jnp.minimum(table_smem[slot, j] * bt, keys_per_seq - bt)

  def block_copies(c, buf, g):
    row = seq_base + block_start(c * g_count + g)
    rows = pl.ds(g * bt, bt)
    return (pltpu.make_async_copy(kv_hbm_ref.at[pl.ds(row, bt)], kv_buf.at[buf, rows], block_sems.at[0, buf]),
            pltpu.make_async_copy(pe_hbm_ref.at[pl.ds(row, bt)], pe_buf.at[buf, rows], block_sems.at[1, buf]))

  def start_chunk(c, buf):
    for g in range(g_count):
      for copy in block_copies(c, buf, g):
        copy.start()

  def wait_chunk(buf):
    pltpu.make_async_copy(kv_buf.at[buf], kv_buf.at[buf], block_sems.at[0, buf]).wait()
    pltpu.make_async_copy(pe_buf.at[buf], pe_buf.at[buf], block_sems.at[1, buf]).wait()

  def chunk_mask(c):
    """[1, chunk] bool: the selected tokens of the chunk's blocks, from the SMEM mask words."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    block_of_lane = lane // bt
    shift = jnp.zeros((1, chunk), jnp.int32)
    low = jnp.zeros((1, chunk), jnp.int32)
    high = jnp.zeros((1, chunk), jnp.int32)
    for g in range(g_count):
      j = c * g_count + g
      here = block_of_lane == g
      shift = jnp.where(here, table_smem[slot, j] * bt - block_start(j), shift)
      low = jnp.where(here, table_smem[slot, slots + 2 * j], low)
      high = jnp.where(here, table_smem[slot, slots + 2 * j + 1], high)
    offset = (lane % bt) - shift                  # token offset inside its block
    word = jnp.where(offset < 32, low, high)
    bit = jax.lax.shift_right_logical(word, jnp.bitwise_and(offset, 31)) & 1
    return (offset >= 0) & (bit == 1)

  n_chunks = jnp.maximum((n_blocks_ref[n] + g_count - 1) // g_count, 1)
  sparse_mla_tpu.attend_chunks(q_lat_ref, q_pe_ref, out_ref, kv_buf, pe_buf, n_chunks, start_chunk, wait_chunk,
                               chunk_mask, scale)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def sparse_mla_blocks(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
                      k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float, *,
                      config: SparseMlaBlocksTpuConfig = DEFAULT_CONFIG, interpret=None) -> Float[Array, "b s h c"]:
  """Same contract as :func:`pallas_kernels.sparse_mla_tpu.sparse_mla` (indices distinct)."""
  b, s, h, c = q_lat.shape
  t, r = kv.shape[1], k_pe.shape[-1]
  kk = idx.shape[-1]
  bt, g_count = config.block_tokens, config.blocks_per_chunk
  if t < bt:  # too short to hold one block: the token kernel does it
    return sparse_mla_tpu.sparse_mla(q_lat, q_pe, kv, k_pe, idx, scale, interpret=interpret)
  if q_pe.shape != (b, s, h, r) or kv.shape != (b, t, c) or k_pe.shape != (b, t, r) or idx.shape[:2] != (b, s):
    raise ValueError(f"sparse_mla_blocks: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, kv {kv.shape}, "
                     f"k_pe {k_pe.shape}, idx {idx.shape} do not agree")
  n = b * s
  slots = -(-kk // g_count) * g_count             # block slots, a whole number of chunks
  idx = idx.astype(jnp.int32).reshape(n, kk)
  if slots != kk:
    idx = jnp.pad(idx, ((0, 0), (0, slots - kk)), constant_values=-1)
  table, n_blocks = block_table(idx, bt)
  kv = kv.astype(q_lat.dtype)
  k_pe = k_pe.astype(q_lat.dtype)
  kernel = functools.partial(_sparse_mla_blocks_kernel, queries_per_seq=s, keys_per_seq=t, slots=slots,
                             block_tokens=bt, blocks_per_chunk=g_count, scale=float(scale))
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(n,),
          in_specs=[
              pl.BlockSpec((None, h, c), lambda i, nb: (i, 0, 0)),
              pl.BlockSpec((None, h, r), lambda i, nb: (i, 0, 0)),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
          ],
          out_specs=pl.BlockSpec((None, h, c), lambda i, nb: (i, 0, 0)),
          scratch_shapes=[
              pltpu.SMEM((2, 3 * slots), jnp.int32),
              pltpu.VMEM((2, g_count * bt, c), q_lat.dtype),
              pltpu.VMEM((2, g_count * bt, r), q_lat.dtype),
              pltpu.SemaphoreType.DMA((2,)),
              pltpu.SemaphoreType.DMA((2, 2)),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct((n, h, c), q_lat.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                           vmem_limit_bytes=config.vmem_limit_bytes),
      interpret=interpret_params(interpret),
      name="dsa_sparse_mla_blocks",
  )(n_blocks, q_lat.reshape(n, h, c), q_pe.reshape(n, h, r), table, kv.reshape(b * t, c), k_pe.reshape(b * t, r))
  return out.reshape(b, s, h, c)
