"""Sparse MLA on a GPU: attention in the latent over each query's selected rows (Pallas, Triton lowering).

For every query t and head h, over the rows j that idx[t] selects (-1: an unused slot),

  o[t, h] = sum_j softmax_j(scale * (q_lat[t,h] . kv[idx[t,j]] + q_pe[t,h] . k_pe[idx[t,j]])) kv[idx[t,j]]
  lse[t, h] = log sum_j exp(scale * score_j)            (natural log; for a backward pass or training)

which is ``dsv32_jax.mla.sparse_attention_scaled`` (the reference) plus the log-sum-exp.

Why Triton and not (yet) Mosaic GPU: the selected rows are scattered over the cache, one 1152-byte row
at a time, and Hopper's TMA has no gather (Blackwell's has). Pallas Mosaic GPU's own copies (jax 0.11.2)
cannot gather either: a tiled smem ref takes only tile-aligned slices (``TilingTransform.commute_ndindexer``)
and its ``cp.async`` path takes no indices ("Gather/scatter unsupported for the CP_ASYNC implementation",
``mosaic/gpu/launch_context.py``); Pallas's Triton lowering gathers rows with per-thread loads into the
layout its MMA wants. Two ways around both work on an H100 (``benchmarks/gather_rows_mgpu.py``): per-row
TMA into a (1, 64)-tiled view aliased with the (8, 64) one wgmma reads is issue-bound at ~0.75 TB/s, but
16-byte ``cp.async`` copies from all 128 threads of a warpgroup, written through ``plgpu.inline_mgpu``
straight to their swizzled places, gather at 1.8 TB/s (2.8 from L2) unpipelined. The FlashMLA-style
kernel on that gather, ``pallas_kernels/sparse_mla_mgpu.py``, is 1.4-1.6x this one in prefill on an H100
(BENCHMARKS.md) and is the default for bf16 caches on Hopper; this one serves FP8 caches, float32 and
other GPUs.

Work decomposition. A program owns one query, ``block_h`` heads (MLA's MQA form: every head reads the
same rows, so a gathered tile serves all of them -- the FlashMLA lesson) and a contiguous share of the
query's top-k slots (``k_splits`` programs per query when the batch is small, flash-decoding style:
their partial outputs and log-sum-exps are merged afterwards). Tiles of ``block_k`` selected rows are
gathered (latent 512 + rope 64), scored against the heads with two MMAs, and folded into the output
by an online softmax in float32; tiles past a query's last valid slot are not visited (a query that
sees fewer keys than k, as the first k of a prefill, does proportionally less work). The latent may
come from an FP8 cache (e4m3 + a scale per 128 values, FlashMLA's 656 bytes a token with the bf16
rope), dequantised tile by tile after the gather.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from dsv32_jax.mla import sparse_attention_scaled as reference  # noqa: F401  (what this kernel matches)

NUM_SMS = 132  # H100 / H200 SXM


@dataclasses.dataclass(frozen=True)
class SparseMlaGpuConfig:
  """Tiling of the sparse MLA kernel."""

  block_h: int = 32             # heads per program (the MMA M dimension)
  block_k: int = 64             # selected rows per tile
  k_splits: int | None = None   # programs per (query, head block) along the top-k; None: fill the GPU
  num_warps: int = 4
  num_stages: int = 2
  heads_inner: bool = False     # launch a query's head blocks next to each other (the grid's fastest axis), so
                                # the second reads the rows the first just pulled into L2

  def __post_init__(self):
    for name in ("block_h", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"SparseMlaGpuConfig.{name} = {v} must be a power of two >= 16")


# Measured on an H100 (BENCHMARKS.md, sparse MLA): 32/64/4 with 4 pipeline stages and a query's head blocks
# side by side is the best bf16 tiling in prefill (221 TFLOP/s at 4K and 128K; 2 stages: 209 / 171) and
# in decode at batch 128 (0.49 ms; 32/64/4/2 0.67). From an FP8 cache 64/64/8/2 is 2.1x faster than
# 32/64/4/2 at batch 32 (twice the heads share each dequantised tile).
DEFAULT_CONFIG = SparseMlaGpuConfig(block_h=32, block_k=64, num_warps=4, num_stages=4, heads_inner=True)
FP8_CACHE_CONFIG = SparseMlaGpuConfig(block_h=64, block_k=64, num_warps=8, num_stages=2)


def supports(c: int, r: int) -> bool:
  """Whether the kernel takes a latent of c and a rope part of r values (Triton blocks: powers of two)."""
  return all(v >= 16 and not v & (v - 1) for v in (c, r))


def _k_splits(config: SparseMlaGpuConfig, programs: int, tiles: int) -> int:
  if config.k_splits is not None:
    return max(1, min(config.k_splits, tiles))
  return max(1, min(tiles, -(-2 * NUM_SMS // max(programs, 1))))


def sparse_mla_gpu(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
                   k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float,
                   config: SparseMlaGpuConfig | None = None, interpret: bool = False,
                   kv_scale: Float[Array, "b t cb"] | None = None,
                   ) -> tuple[Float[Array, "b s h c"], Float[Array, "b s h"]]:
  """(output in q_lat's dtype, log-sum-exp float32). A query with no valid slot gets zeros and -inf.

  An FP8 latent cache (FlashMLA's 656 bytes a token: 512 e4m3 + 4 float32 scales + 64 bf16 rope) is
  ``kv`` in e4m3 with ``kv_scale`` [B, T, 512/128]: each gathered tile is dequantised in the kernel.
  The release rounds the latent through e4m3 with per-128 scales before caching, so this cache holds
  exactly the values of the bf16 one. config: None takes DEFAULT_CONFIG, or FP8_CACHE_CONFIG for an
  e4m3 cache. Float32 operands are multiplied in full float32 (not TF32), for exact comparisons.
  """
  b, s, h, c = q_lat.shape
  r, t, k = q_pe.shape[-1], kv.shape[1], idx.shape[-1]
  if kv.shape != (b, t, c) or k_pe.shape != (b, t, r) or q_pe.shape != (b, s, h, r) or idx.shape[:2] != (b, s):
    raise ValueError(f"sparse_mla_gpu: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, kv {kv.shape}, "
                     f"k_pe {k_pe.shape}, idx {idx.shape} do not agree")
  if not supports(c, r):
    raise ValueError(f"sparse_mla_gpu: latent {c} and rope {r} dims must be powers of two >= 16")
  fp8 = kv.dtype == jnp.float8_e4m3fn
  if fp8 != (kv_scale is not None):
    raise ValueError(f"sparse_mla_gpu: an e4m3 latent cache needs kv_scale and only it takes one (kv {kv.dtype}, "
                     f"kv_scale {'given' if kv_scale is not None else 'missing'})")
  if fp8 and (kv_scale.shape[:2] != (b, t) or c % kv_scale.shape[2]):
    raise ValueError(f"sparse_mla_gpu: kv_scale {kv_scale.shape} must be [B, T, groups] with {c} divisible by groups")
  group = c // kv_scale.shape[2] if fp8 else c
  config = config or (FP8_CACHE_CONFIG if fp8 else DEFAULT_CONFIG)
  precision = lax.Precision.HIGHEST if q_lat.dtype == jnp.float32 else None  # Triton's default is TF32
  dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)
  bh, bk = min(config.block_h, max(16, 1 << (h - 1).bit_length())), config.block_k
  h_pad, k_pad = -(-h // bh) * bh, -(-k // bk) * bk
  if h_pad != h:
    q_lat = jnp.pad(q_lat, ((0, 0), (0, 0), (0, h_pad - h), (0, 0)))
    q_pe = jnp.pad(q_pe, ((0, 0), (0, 0), (0, h_pad - h), (0, 0)))
  if k_pad != k:
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, k_pad - k)), constant_values=-1)
  idx = jnp.where((idx >= 0) & (idx < t), idx, -1).astype(jnp.int32)
  n_hb, tiles = h_pad // bh, k_pad // bk
  # Tiles past a query's last valid slot hold only -1 and are skipped: the selection puts its unused
  # slots last, so a query that sees fewer keys than k (the first k of a prefill) does less work.
  live_tiles = count_live_tiles(idx, bk)  # [b, s]
  splits = _k_splits(config, b * s * n_hb, tiles)
  tiles_per_split = -(-tiles // splits)

  n_groups = c // group  # latent column groups: one scale each in an FP8 cache, the whole latent otherwise

  def kernel(live_tiles_ref, idx_ref, q_lat_ref, q_pe_ref, kv_ref, k_pe_ref, *refs):
    kv_scale_ref, o_ref, lse_ref = refs if fp8 else (None, *refs)
    query, hi = (pl.program_id(1), pl.program_id(0)) if config.heads_inner else (pl.program_id(0), pl.program_id(1))
    bi, si, split = query // s, query % s, pl.program_id(2)
    heads = pl.ds(hi * bh, bh)
    # The latent in column groups (4 x 128 for an FP8 cache, so that each gathered group is scaled by one
    # value a row; 1 x 512 for bf16): scores sum over the groups, the output is kept per group.
    q = [q_lat_ref[bi, si, heads, pl.ds(g * group, group)] for g in range(n_groups)]  # [bh, group] each
    qp = q_pe_ref[bi, si, heads, :]      # [bh, r]
    group_cols, rope_cols = jnp.arange(group, dtype=jnp.int32), jnp.arange(r, dtype=jnp.int32)
    first = split * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, live_tiles_ref[bi, si])

    def gather_latent(rows, g):  # [bk, group] of the selected rows, in the queries' dtype
      part = kv_ref[bi, rows[:, None], (g * group + group_cols)[None, :]]  # one gathered row per slot
      if not fp8:
        return part
      scale_of_row = kv_scale_ref[bi, rows[:, None], jnp.full((1, 1), g, jnp.int32)]  # [bk, 1]
      return (part.astype(jnp.float32) * scale_of_row).astype(q[g].dtype)

    def tile(j, carry):
      acc, m, l = carry
      ids = idx_ref[bi, si, pl.ds(j * bk, bk)]
      valid = ids >= 0
      rows = jnp.where(valid, ids, 0)
      kv_rows = [gather_latent(rows, g) for g in range(n_groups)]
      pe_rows = k_pe_ref[bi, rows[:, None], rope_cols[None, :]]  # [bk, r]
      score = dot(qp, pe_rows.T)
      for q_g, kv_g in zip(q, kv_rows):
        score += dot(q_g, kv_g.T)
      score = jnp.where(valid[None, :], score * scale, -jnp.inf)
      m_new = jnp.maximum(m, score.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no valid slot yet: nothing to rescale
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(score - m_safe[:, None])
      acc = tuple(a * alpha[:, None] + dot(p.astype(kv_g.dtype), kv_g) for a, kv_g in zip(acc, kv_rows))
      return acc, m_new, l * alpha + p.sum(axis=1)

    init = (tuple(jnp.zeros((bh, group), jnp.float32) for _ in range(n_groups)),
            jnp.full((bh,), -jnp.inf, jnp.float32), jnp.zeros((bh,), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, tile, init)
    seen = l > 0
    norm = jnp.where(seen, l, 1.0)[:, None]
    for g, a in enumerate(acc):
      o_ref[bi, si, split, heads, pl.ds(g * group, group)] = (a / norm).astype(o_ref.dtype)
    lse_ref[bi, si, split, heads] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)

  out_dtype = q_lat.dtype if splits == 1 else jnp.float32
  o, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, s, splits, h_pad, c), out_dtype),
                 jax.ShapeDtypeStruct((b, s, splits, h_pad), jnp.float32)),
      grid=(n_hb, b * s, splits) if config.heads_inner else (b * s, n_hb, splits),
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="sparse_mla_gpu",
  )(live_tiles, idx, q_lat, q_pe, kv, k_pe, *((kv_scale.astype(jnp.float32),) if fp8 else ()))
  o, lse = merge_splits(o, lse, q_lat.dtype)
  return o[..., :h, :], lse[..., :h]


def count_live_tiles(idx: Int[Array, "*q k"], block_k: int) -> Int[Array, "*q"]:
  """Tiles of block_k slots up to each row's last valid (>= 0) slot: the tiles a kernel must visit."""
  slots = jnp.arange(1, idx.shape[-1] + 1, dtype=jnp.int32)
  return -(-jnp.max(jnp.where(idx >= 0, slots, 0), axis=-1) // block_k)


def merge_splits(o: Float[Array, "b s n h c"], lse: Float[Array, "b s n h"], dtype) -> tuple[Array, Array]:
  """Merges the partial softmaxes of n splits of the top-k (flash-decoding): weights exp(lse_i - lse)."""
  if o.shape[2] == 1:
    return o[:, :, 0].astype(dtype), lse[:, :, 0]
  total = jax.nn.logsumexp(lse, axis=2, keepdims=True)
  w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)), 0.0)
  return jnp.sum(o.astype(jnp.float32) * w[..., None], axis=2).astype(dtype), total[:, :, 0]


def flops(b: int, s: int, h: int, c: int, r: int, k: int) -> float:
  """Useful FLOPs of sparse MLA over k selected rows: scores (c + r) and output (c) per head and row."""
  return 2.0 * b * s * h * k * (2 * c + r)

