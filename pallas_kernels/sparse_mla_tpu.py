"""Sparse MLA attention over the top-k latent rows, token by token, as a Pallas Mosaic TPU kernel.

Reference: :func:`dsv32_jax.mla.sparse_attention_scaled` (the MQA form of MLA over gathered rows)::

  o[t, h] = softmax_j((q_lat[t,h] . c[idx[t,j]] + q_pe[t,h] . k_pe[idx[t,j]]) * scale) . c[idx[t,j]]

over the slots ``j`` with ``idx[t, j] >= 0``. A query with no valid slot returns zeros (the reference
returns NaN there; the model never asks for it: every query sees at least itself).

Structure. One grid step is one query token with all its heads (``[H, 512]``: 128 rows for the MXU at
671B); steps run in order (``arbitrary``). The step's row of indices is copied HBM -> SMEM by DMA,
double-buffered across steps (row ``n + 1`` is in flight while step ``n`` runs), as
``ragged_paged_attention`` scalar-prefetches its page table. The selected rows are then fetched
from the latent cache in HBM by one DMA per row and per part (``c``: 1 KiB in bf16, ``k_pe``:
128 B), ``chunk`` rows at a time into a double buffer: the DMAs of chunk ``c + 1`` are issued before
chunk ``c`` is computed. Each chunk does ``[H, 512] x [512, chunk]`` + ``[H, 64] x [64, chunk]`` for
the scores and ``[H, chunk] x [chunk, 512]`` for the values, with an online softmax in float32
(FlashAttention's running max and sum), so the ``[H, 2048]`` probabilities never leave VMEM.
Only ``ceil((last valid slot + 1) / chunk)`` chunks are visited.

Invalid slots (``-1``) fetch row 0 of the sequence and are masked. Indices must be in ``[0, T)``
(``-1`` aside); DMAs do not bounds-check them on a TPU.

Token-granular DMAs are small (1 KiB): whether the DMA engines and the scalar core that issues the
4096 descriptors of a 2048-row query keep up with the MXU is the open question that
:mod:`pallas_kernels.sparse_mla_blocks_tpu` answers the other way; docs/tpu.md has the analysis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.tpu_common import interpret_params, round_up

REFERENCE = "dsv32_jax.mla.sparse_attention_scaled"

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite: a fully masked chunk stays NaN-free


@dataclasses.dataclass(frozen=True)
class SparseMlaTpuConfig:
  """Tiling of the token-granular sparse MLA kernel.

  chunk: selected rows per compute step and per DMA batch (a multiple of 128 for the MXU; a
    selection shorter than that is one chunk); two chunks of latent rows are resident:
    2 x 128 x (512 + 64) x 2 B = 288 KiB in bf16.
  """

  chunk: int = 128
  vmem_limit_bytes: int = 32 * 1024 * 1024


DEFAULT_CONFIG = SparseMlaTpuConfig()


def masked_scores(q_lat, q_pe, kv, pe, scale: float, mask):
  """(q_lat . kv + q_pe . pe) * scale for one chunk of rows, float32 [H, chunk]; MASK_VALUE where not mask."""
  precision = jax.lax.Precision.HIGHEST if q_lat.dtype == jnp.float32 else None
  contract_last = (((1,), (1,)), ((), ()))
  scores = (jax.lax.dot_general(q_lat, kv, contract_last, preferred_element_type=jnp.float32, precision=precision)
            + jax.lax.dot_general(q_pe, pe, contract_last, preferred_element_type=jnp.float32,
                                  precision=precision)) * scale
  return jnp.where(mask, scores, MASK_VALUE)


def attend_chunks(q_lat_ref, q_pe_ref, out_ref, kv_buf, pe_buf, n_chunks, start_chunk, wait_chunk, chunk_mask,
                  scale: float) -> None:
  """The double-buffered loop both sparse MLA kernels share: fetch chunk c+1 while attending to chunk c
  (``chunk_mask(c)``: which of its rows count), online softmax over all 128 heads, output written once."""
  q_lat = q_lat_ref[...]
  q_pe = q_pe_ref[...]
  heads, latent = q_lat.shape
  start_chunk(0, 0)

  def body(c, carry):
    buf = c % 2

    @pl.when(c + 1 < n_chunks)
    def _prefetch_next_chunk():
      start_chunk(c + 1, 1 - buf)

    wait_chunk(buf)
    kv = kv_buf[buf]
    return online_softmax_step(*carry, masked_scores(q_lat, q_pe, kv, pe_buf[buf], scale, chunk_mask(c)), kv)

  init = (jnp.full((heads, 1), MASK_VALUE, jnp.float32), jnp.zeros((heads, 1), jnp.float32),
          jnp.zeros((heads, latent), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
  out_ref[...] = finish_softmax(m, l, acc, out_ref.dtype)


def online_softmax_step(m_prev, l_prev, acc_prev, scores, values):
  """FlashAttention's update: scores [H, n] f32 (masked entries MASK_VALUE), values [n, C]."""
  m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
  correction = jnp.exp(m_prev - m_next)
  p = jnp.exp(scores - m_next)
  l_next = l_prev * correction + p.sum(axis=1, keepdims=True)
  pv = jnp.dot(p.astype(values.dtype), values, preferred_element_type=jnp.float32,
               precision=jax.lax.Precision.HIGHEST if values.dtype == jnp.float32 else None)
  return m_next, l_next, acc_prev * correction + pv


def finish_softmax(m, l, acc, dtype):
  """acc / l; zeros for a query that saw no valid slot (its running max never left MASK_VALUE)."""
  return jnp.where(m > 0.5 * MASK_VALUE, acc / l, 0.0).astype(dtype)


def _sparse_mla_kernel(n_chunks_ref, q_lat_ref, q_pe_ref, idx_ref, idx_hbm_ref, kv_hbm_ref, pe_hbm_ref,
                       out_ref, idx_smem, kv_buf, pe_buf, idx_sem, row_sems, *, queries_per_seq: int,
                       keys_per_seq: int, chunk: int, scale: float):
  """Step n = one query (flattened batch x query). Refs:

  n_chunks_ref [N] (SMEM prefetch); q_lat_ref [H, C], q_pe_ref [H, R], idx_ref [1, K] (VMEM, for
  the mask); idx_hbm_ref [N, K], kv_hbm_ref [B*T, C], pe_hbm_ref [B*T, R] (HBM); out_ref [H, C];
  scratch: idx_smem [2, K], kv_buf [2, chunk, C], pe_buf [2, chunk, R], DMA semaphores.
  """
  n = pl.program_id(0)
  n_queries = pl.num_programs(0)
  slot = n % 2

  def index_row_copy(row, s):
    return pltpu.make_async_copy(idx_hbm_ref.at[pl.ds(row, 1)], idx_smem.at[pl.ds(s, 1)], idx_sem.at[s])

  @pl.when(n == 0)
  def _first_index_row():
    index_row_copy(0, 0).start()

  @pl.when(n + 1 < n_queries)
  def _prefetch_next_index_row():
    index_row_copy(n + 1, 1 - slot).start()

  index_row_copy(n, slot).wait()

  seq_base = (n // queries_per_seq) * keys_per_seq   # first row of this sequence in the flat cache

  def row_copies(c, buf, j):
    entry = idx_smem[slot, c * chunk + j]
    row = seq_base + jnp.maximum(entry, 0)
    return (pltpu.make_async_copy(kv_hbm_ref.at[pl.ds(row, 1)], kv_buf.at[buf, pl.ds(j, 1)], row_sems.at[0, buf]),
            pltpu.make_async_copy(pe_hbm_ref.at[pl.ds(row, 1)], pe_buf.at[buf, pl.ds(j, 1)], row_sems.at[1, buf]))

  def start_chunk(c, buf):
    def issue(j, carry):
      for copy in row_copies(c, buf, j):
        copy.start()
      return carry
    jax.lax.fori_loop(0, chunk, issue, 0)

  def wait_chunk(buf):
    # One wait per buffer: the semaphore counts the bytes of all `chunk` row copies.
    pltpu.make_async_copy(kv_buf.at[buf], kv_buf.at[buf], row_sems.at[0, buf]).wait()
    pltpu.make_async_copy(pe_buf.at[buf], pe_buf.at[buf], row_sems.at[1, buf]).wait()

  def valid(c):
    return idx_ref[:, pl.ds(pl.multiple_of(c * chunk, chunk), chunk)] >= 0        # [1, chunk]

  attend_chunks(q_lat_ref, q_pe_ref, out_ref, kv_buf, pe_buf, n_chunks_ref[n], start_chunk, wait_chunk, valid, scale)


def chunks_to_visit(idx: Int[Array, "n k"], chunk: int) -> Int[Array, "n"]:
  """ceil((last valid slot + 1) / chunk), at least 1, per row."""
  k = idx.shape[-1]
  last = jnp.max(jnp.where(idx >= 0, jnp.arange(k, dtype=jnp.int32), -1), axis=-1)
  return jnp.maximum((last + chunk) // chunk, 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def sparse_mla(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
               k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float, *,
               config: SparseMlaTpuConfig = DEFAULT_CONFIG, interpret=None) -> Float[Array, "b s h c"]:
  """Latent attention output [B, S, H, C] in q_lat's dtype over the rows idx selects (-1: none)."""
  b, s, h, c = q_lat.shape
  t, r = kv.shape[1], k_pe.shape[-1]
  kk = idx.shape[-1]
  if q_pe.shape != (b, s, h, r) or kv.shape != (b, t, c) or k_pe.shape != (b, t, r) or idx.shape[:2] != (b, s):
    raise ValueError(f"sparse_mla: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, kv {kv.shape}, "
                     f"k_pe {k_pe.shape}, idx {idx.shape} do not agree")
  chunk = min(config.chunk, round_up(kk, 8))     # short selections (tests, tiny models): one chunk
  k_pad = round_up(kk, chunk)
  n = b * s
  idx = idx.astype(jnp.int32).reshape(n, kk)
  if k_pad != kk:
    idx = jnp.pad(idx, ((0, 0), (0, k_pad - kk)), constant_values=-1)
  n_chunks = chunks_to_visit(idx, chunk)
  kv = kv.astype(q_lat.dtype)
  k_pe = k_pe.astype(q_lat.dtype)

  kernel = functools.partial(_sparse_mla_kernel, queries_per_seq=s, keys_per_seq=t, chunk=chunk,
                             scale=float(scale))
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(n,),
          in_specs=[
              pl.BlockSpec((None, h, c), lambda i, nc: (i, 0, 0)),
              pl.BlockSpec((None, h, r), lambda i, nc: (i, 0, 0)),
              pl.BlockSpec((None, 1, k_pad), lambda i, nc: (i, 0, 0)),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
          ],
          out_specs=pl.BlockSpec((None, h, c), lambda i, nc: (i, 0, 0)),
          scratch_shapes=[
              pltpu.SMEM((2, k_pad), jnp.int32),
              pltpu.VMEM((2, chunk, c), q_lat.dtype),
              pltpu.VMEM((2, chunk, r), q_lat.dtype),
              pltpu.SemaphoreType.DMA((2,)),
              pltpu.SemaphoreType.DMA((2, 2)),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct((n, h, c), q_lat.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                           vmem_limit_bytes=config.vmem_limit_bytes),
      interpret=interpret_params(interpret),
      name="dsa_sparse_mla",
  )(n_chunks, q_lat.reshape(n, h, c), q_pe.reshape(n, h, r), idx.reshape(n, 1, k_pad), idx,
    kv.reshape(b * t, c), k_pe.reshape(b * t, r))
  return out.reshape(b, s, h, c)
