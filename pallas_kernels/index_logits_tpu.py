"""Lightning-indexer logits as a Pallas Mosaic TPU kernel.

Reference: :func:`dsv32_jax.indexer.index_logits` (same formula; visibility given by query positions
instead of a mask, which is what the model's mask is)::

  I[b,t,s] = k_scale[b,s] * sum_h w[b,t,h] * ReLU(q[b,t,h] . k[b,s])   if s <= pos[b,t], else -inf

Tiling. The grid is (batch, query block, key block), all independent. One step holds ``bq`` queries
x ``H`` heads as a single ``[bq*H, D]`` MXU operand (H = 64, D = 128 at 671B: 2048 rows for bq = 32)
against ``bk`` keys ``[bk, D]``; the ``[bq*H, keys]`` float32 product exists only inside the step,
one key chunk at a time: ReLU, the per-head weights and the head sum are applied there, so only the
``[bq, bk]`` logits reach HBM (the reference materialises ``[B, S, H, T]``).

FP8. The key cache stays e4m3 in HBM (128 B a token plus its float32 scale) and is widened to bf16
in VMEM -- exactly, e4m3 fits in bf16 -- because the MXU of v5e/v5p/v6e has no e4m3 input; the
products and their sum are float32, as in the reference. ``fp8_matmul=True`` hands the e4m3 operands
to the MXU unchanged, for chips whose MXU takes e4m3 (TPU7x); the result is the same (e4m3 x e4m3
products are exact in float32).

Causality. The last visible key of each query block is scalar-prefetched. Key blocks past it are not
fetched (the key index map clamps to the last needed block, so the pipeline sees an unchanged block
index and issues no DMA) and their logits are written as -inf without touching the MXU; inside the
diagonal block, key chunks past it are skipped the same way. A causal prefill therefore does half
the work of the full rectangle, as the reference's mask does not.

Decode is the same kernel with ``S = 1`` (2 with MTP): the query block is the whole ``S``, so a step
is ``[H, D] x [D, bk]`` and the kernel streams the key cache once (memory bound, see docs/tpu.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.tpu_common import cdiv, interpret_params, round_up

REFERENCE = "dsv32_jax.indexer.index_logits"


@dataclasses.dataclass(frozen=True)
class IndexLogitsTpuConfig:
  """Tiling of the TPU indexer-logits kernel.

  block_q: queries per step (prefill); ``bq * H`` rows feed the MXU. Decode uses ``S`` itself.
  block_k: keys per step (the key DMA and the output block): 512 keys x 132 B = 66 KB a step.
  key_chunk: keys per inner chunk; bounds the float32 ``[bq*H, key_chunk]`` product (2 MiB at
    bq = 32, H = 64, 256 keys).
  fp8_matmul: give e4m3 operands to the MXU as they are (TPU7x); otherwise widen them to bf16.
  vmem_limit_bytes: scoped VMEM for Mosaic (default scoped limits are 16-32 MiB).
  """

  block_q: int = 32
  block_k: int = 512
  key_chunk: int = 256
  fp8_matmul: bool = False
  vmem_limit_bytes: int = 48 * 1024 * 1024

  def __post_init__(self):
    if self.block_k % self.key_chunk:
      raise ValueError(f"block_k = {self.block_k} must be a multiple of key_chunk = {self.key_chunk}")
    if self.block_q % 8 or self.key_chunk % 128:
      raise ValueError("block_q must be a multiple of 8 and key_chunk a multiple of 128")


DEFAULT_CONFIG = IndexLogitsTpuConfig()


def _is_fp8(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def _index_logits_kernel(last_key_ref, q_ref, w_ref, k_ref, k_scale_ref, pos_ref, out_ref, *,
                         heads: int, block_k: int, key_chunk: int, operand_dtype, precision):
  """One (batch, query block, key block) step. Refs (batch dim squeezed):

  last_key_ref [B, nq] (SMEM, scalar prefetch) -- the last visible key of each query block;
  q_ref [bq*H, D]; w_ref [bq*H, 1] f32; k_ref [bk, D]; k_scale_ref [1, bk] f32; pos_ref [bq, 1] i32;
  out_ref [bq, bk] f32.
  """
  b, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  last_key = last_key_ref[b, qi]
  block_start = ki * block_k
  bq = out_ref.shape[0]

  @pl.when(block_start > last_key)
  def _invisible_block():
    out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(block_start <= last_key)
  def _visible_block():
    q = q_ref[...]
    if operand_dtype is not None:
      q = q.astype(operand_dtype)
    w = w_ref[...]                                   # [bq*H, 1]: one weight per (query, head) row
    pos = pos_ref[...]                               # [bq, 1]
    for c in range(out_ref.shape[1] // key_chunk):
      chunk = pl.ds(c * key_chunk, key_chunk)
      chunk_start = block_start + c * key_chunk

      @pl.when(chunk_start > last_key)
      def _invisible_chunk():
        out_ref[:, chunk] = jnp.full((bq, key_chunk), -jnp.inf, jnp.float32)

      @pl.when(chunk_start <= last_key)
      def _visible_chunk():
        k = k_ref[chunk, :]
        if operand_dtype is not None:
          k = k.astype(operand_dtype)
        dots = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                   precision=precision)               # [bq*H, chunk] in f32
        weighted = jnp.maximum(dots, 0.0) * w
        logits = weighted.reshape(bq, heads, key_chunk).sum(axis=1)   # head sum: [bq, chunk]
        logits = logits * k_scale_ref[:, chunk]
        key_pos = chunk_start + jax.lax.broadcasted_iota(jnp.int32, (bq, key_chunk), 1)
        out_ref[:, chunk] = jnp.where(key_pos <= pos, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def index_logits(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                 k_scale: Float[Array, "b t"], positions: Int[Array, "b s"], *,
                 config: IndexLogitsTpuConfig = DEFAULT_CONFIG, interpret=None) -> Float[Array, "b s t"]:
  """Indexer logits [B, S, T] (float32, -inf where key s > positions[b, t]).

  q and k are e4m3 (the released FP8 indexer) or a float dtype (unquantised); w carries the query
  scales and the head/softmax scales (``indexer.indexer_queries``). Queries with a negative
  position see no key.
  """
  b, s, h, d = q.shape
  t = k.shape[1]
  if k.shape != (b, t, d) or w.shape != (b, s, h) or k_scale.shape != (b, t) or positions.shape != (b, s):
    raise ValueError(f"index_logits: shapes q {q.shape}, w {w.shape}, k {k.shape}, k_scale {k_scale.shape},"
                     f" positions {positions.shape} do not agree")
  fp8 = _is_fp8(q.dtype) or _is_fp8(k.dtype)
  if fp8 and config.fp8_matmul and _is_fp8(q.dtype) and _is_fp8(k.dtype):
    operand_dtype = None                      # the MXU takes e4m3 (TPU7x)
  elif fp8:
    operand_dtype = jnp.bfloat16              # widened in VMEM; exact
  else:
    operand_dtype = jnp.promote_types(q.dtype, k.dtype)
  precision = jax.lax.Precision.HIGHEST if operand_dtype == jnp.float32 else None

  # Query blocks: the whole S when it is short (decode), else block_q with S padded up.
  bq = s if s <= config.block_q else config.block_q
  s_pad = round_up(s, bq)
  positions = positions.astype(jnp.int32)
  if s_pad != s:
    pad = s_pad - s
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    w = jnp.pad(w, ((0, 0), (0, pad), (0, 0)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
  # Key blocks: the whole T when it is short, else block_k with a partial last block.
  bk = t if t <= config.block_k else config.block_k
  key_chunk = config.key_chunk if bk % config.key_chunk == 0 else bk
  nq, nk = s_pad // bq, cdiv(t, bk)

  last_key = jnp.minimum(positions.reshape(b, nq, bq).max(axis=-1), t - 1)   # [B, nq]
  q_rows = q.reshape(b, s_pad * h, d)
  w_rows = w.astype(jnp.float32).reshape(b, s_pad * h, 1)
  k_scale_row = k_scale.astype(jnp.float32).reshape(b, 1, t)
  pos_col = positions.reshape(b, s_pad, 1)

  def key_block(bi, qi, ki, last_key_ref):
    return jnp.minimum(ki, jnp.maximum(last_key_ref[bi, qi], 0) // bk)

  kernel = functools.partial(_index_logits_kernel, heads=h, block_k=bk, key_chunk=key_chunk,
                             operand_dtype=operand_dtype, precision=precision)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, nq, nk),
          in_specs=[
              pl.BlockSpec((None, bq * h, d), lambda bi, qi, ki, lk: (bi, qi, 0)),
              pl.BlockSpec((None, bq * h, 1), lambda bi, qi, ki, lk: (bi, qi, 0)),
              pl.BlockSpec((None, bk, d), lambda bi, qi, ki, lk: (bi, key_block(bi, qi, ki, lk), 0)),
              pl.BlockSpec((None, 1, bk), lambda bi, qi, ki, lk: (bi, 0, key_block(bi, qi, ki, lk))),
              pl.BlockSpec((None, bq, 1), lambda bi, qi, ki, lk: (bi, qi, 0)),
          ],
          out_specs=pl.BlockSpec((None, bq, bk), lambda bi, qi, ki, lk: (bi, qi, ki)),
      ),
      out_shape=jax.ShapeDtypeStruct((b, s_pad, t), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                           vmem_limit_bytes=config.vmem_limit_bytes),
      interpret=interpret_params(interpret),
      name="dsa_index_logits",
  )(last_key, q_rows, w_rows, k, k_scale_row, pos_col)
  return out[:, :s] if s_pad != s else out
