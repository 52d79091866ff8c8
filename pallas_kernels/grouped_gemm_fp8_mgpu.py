"""Grouped FP8 GEMM with 128x128 block-scaled weights for the routed experts (Pallas Mosaic GPU).

For rows sorted by expert in the *block-aligned layout* (each expert's rows padded to a multiple of
``block_m``, as DeepGEMM's contiguous layout and vLLM's ``moe_align_block_size`` do), computes

  out[r, n] = sum_kb  xs[r, kb] * ws[e, n // 128, kb] * (xq[r, kb*128:(kb+1)*128] . w[e, n, kb*128:(kb+1)*128])

with e = block_expert[r // block_m]: the official ``fp8_gemm`` (e4m3 activations quantised per 1x128
with their scales, e4m3 weights with a scale per 128x128 block), one expert per row block. Blocks
with ``block_expert < 0`` (past the last used block) are skipped and left unwritten.

Work decomposition. Each compute warpgroup owns a 64 x ``block_n`` output tile of one expert (64: the
wgmma M; ``block_n``: whole weight-scale blocks of 128 columns). K streams in 128-wide steps through a
TMA pipeline; each step's FP8 wgmma over 128 columns accumulates into a fresh float32 accumulator,
which is then *promoted* into the running sum with the step's scales (x's per-row scale times the
weight block's scalar): the two-level accumulation DeepGEMM uses, since FP8 wgmma has no per-block
scales of its own. The running sum is 64 registers a thread per 128 columns, the step's product 64.

Two schedules (``GroupedGemmConfig.consumers``): 1 -- one warpgroup per CTA issues the TMA pipeline
and waits for each step's wgmma before promoting it; 2 (the default where N is a multiple of 256) --
warp specialisation as in DeepGEMM: a TMA warpgroup feeds two compute warpgroups, side by side
(``block_m`` = 64: they share the x tile) or stacked (``block_m`` = 128: they share the weight tile),
so one's promotion overlaps the other's wgmma. Measured on an H200 at the 671B expert shapes, 2 side
by side with a 4-step pipeline beat 1 at every size (1.25x at 1K rows, 1.27x at 128K: BENCHMARKS.md).
CTAs take their tiles rows first, or in groups of ``group_m`` row blocks across all column blocks.

Several weights of the same shape (an expert's gate and up projections) go in one launch: the
grid's first axis picks the weight, the x tile is read once per weight. With a single group the same
kernel serves every other FP8 linear of the model (``dense_gemm_fp8``, through ``layers.linear``).

Reference: ``grouped_gemm_fp8_reference`` (the dequantised operands through ``jax.lax.ragged_dot``
with the padded group sizes), equal up to the order of the float32 sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from dsv32_jax import quant

FP8 = jnp.float8_e4m3fn
SMEM_BYTES = 224 * 1024  # what a CTA's pipeline and staging tiles may take of Hopper's 227 KiB of shared memory
SCALE_BLOCK = quant.FP8_BLOCK  # 128: the release's weight-scale block and the activation-scale block


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
  """Tiling of the Mosaic GPU grouped FP8 GEMM.

  Each compute warpgroup owns a 64 x ``block_n`` tile of the output (64: the wgmma M). With 2
  warpgroups, ``block_m`` = 64 puts them side by side (the CTA's tile is 64 x 2 block_n, the x tile
  shared) and ``block_m`` = 128 stacks them (128 x block_n, the weight tile shared).
  """

  block_m: int = 64             # rows per CTA (the routing glue pads each expert to it): 64, or 64 x consumers
  block_n: int = 128            # output columns per compute warpgroup: whole weight-scale blocks of 128,
                                # taken one wgmma (and one float32 promotion) at a time
  max_concurrent_steps: int = 4  # depth of the K pipeline (each step: block_m x 128 + CTA columns x 128 bytes)
  consumers: int = 2            # compute warpgroups per CTA: 1, or 2 beside a TMA warpgroup (warp
                                # specialisation). 2 side by side with 4 steps was fastest for the
                                # experts at every size measured (H200, BENCHMARKS.md)
  group_m: int = 0              # tile order: 0 walks all row blocks of a column block first; G > 0 walks
                                # G row blocks across every column block, then the next G, so a wave
                                # of CTAs shares x and w tiles in L2 (Triton's "grouped ordering")

  def __post_init__(self):
    if self.consumers not in (1, 2):
      raise ValueError(f"consumers = {self.consumers}: expected 1 or 2 compute warpgroups")
    if self.block_m not in {64, 64 * self.consumers}:
      raise ValueError(f"block_m = {self.block_m}: expected 64 (warpgroups side by side) or "
                       f"{64 * self.consumers} (one 64-row wgmma tile per warpgroup, stacked)")
    if self.group_m < 0:
      raise ValueError(f"group_m = {self.group_m}: expected 0 (rows first) or a positive group of row blocks")
    if self.block_n % SCALE_BLOCK:
      raise ValueError(f"block_n = {self.block_n} must be a multiple of {SCALE_BLOCK}: the kernel applies one "
                       f"weight scale per 128 columns")

  @property
  def row_groups(self) -> int:
    """Warpgroups stacked along the rows (each 64 of them)."""
    return self.block_m // 64

  @property
  def cta_n(self) -> int:
    """Output columns per CTA."""
    return self.consumers // self.row_groups * self.block_n


DEFAULT_CONFIG = GroupedGemmConfig()
# A prefill's dense linears walk their tiles in groups of 16 row blocks: on the H200 that was 2% (16K rows),
# 6% (32K) and 4% (128K) faster than rows first over wo + wq_b + wq_a, and 3% slower at 4K (BENCHMARKS.md).
GROUPED_ORDER_M = 16
GROUPED_ORDER_FROM = 16384  # rows


def default_config(n: int) -> GroupedGemmConfig:
  """The default tiling for N output columns: warp-specialised where N splits into 256-column CTAs."""
  return DEFAULT_CONFIG if n % DEFAULT_CONFIG.cta_n == 0 else dataclasses.replace(DEFAULT_CONFIG, consumers=1)


def dense_config(m: int, n: int) -> GroupedGemmConfig:
  """The tiling of a dense FP8 linear with M rows and N (padded) output columns.

  N a multiple of 256 (wq_a, wq_b, wo, the indexer's wq_b): the default, side by side. Narrower or ragged N
  (wkv_a's 640 padded columns, the indexer's wk's 128): two warpgroups stacked on 128 x 128 tiles, 5-15%
  faster than one warpgroup at 4K and 128K rows. From ``GROUPED_ORDER_FROM`` rows the tiles go in groups of
  ``GROUPED_ORDER_M`` row blocks. The stacked 128 x 256 tiling was slower than side by side for every wide
  projection (H200, BENCHMARKS.md sessions 24-25).
  """
  config = DEFAULT_CONFIG
  if n % DEFAULT_CONFIG.cta_n:
    config = GroupedGemmConfig(block_m=128, block_n=SCALE_BLOCK, consumers=2)
  return dataclasses.replace(config, group_m=GROUPED_ORDER_M) if m >= GROUPED_ORDER_FROM else config


def _check_operands(xq, xs, weights, w_scales, block_expert, block_m):
  m, k = xq.shape
  if xq.dtype != FP8 or any(w.dtype != FP8 for w in weights):
    raise TypeError(f"grouped_gemm_fp8 takes e4m3 activations and weights, got {xq.dtype} and "
                    f"{[str(w.dtype) for w in weights]}")
  if k % SCALE_BLOCK:
    raise ValueError(f"K = {k} must be a multiple of {SCALE_BLOCK}")
  if xs.shape != (m, k // SCALE_BLOCK):
    raise ValueError(f"activation scales have shape {xs.shape}, expected {(m, k // SCALE_BLOCK)} (one per 1x128 block)")
  if m % block_m or block_expert.shape != (m // block_m,):
    raise ValueError(f"{m} rows with block_m {block_m} need {m // block_m} block experts, got {block_expert.shape} "
                     f"(rows must be padded to a multiple of block_m)")
  shape = weights[0].shape
  for w, s in zip(weights, w_scales):
    if w.shape != shape or w.shape[2] != k or w.shape[1] % SCALE_BLOCK:
      raise ValueError(f"weights must all be [E, N, {k}] with N a multiple of {SCALE_BLOCK}, got "
                       f"{[tuple(x.shape) for x in weights]}")
    if s.shape != (shape[0], shape[1] // SCALE_BLOCK, k // SCALE_BLOCK):
      raise ValueError(f"weight scales have shape {s.shape}, expected "
                       f"{(shape[0], shape[1] // SCALE_BLOCK, k // SCALE_BLOCK)} (one per 128x128 block)")


def grouped_gemm_fp8(xq: Float[Array, "m k"], xs: Float[Array, "m kb"], weights: tuple[Float[Array, "e n k"], ...],
                     w_scales: tuple[Float[Array, "e nb kb"], ...], block_expert: Int[Array, "blocks"],
                     config: GroupedGemmConfig | None = None, out_dtype=jnp.bfloat16,
                     interpret: bool = False) -> Float[Array, "w m n"]:
  """[len(weights), M, N]: each weight's grouped product over the block-aligned rows.

  xq: e4m3 rows sorted by expert, each expert padded to a multiple of block_m; xs: their scales
  per 1x128 block; weights: e4m3 [E, N, K] (the release's [out, in]); w_scales: [E, N/128, K/128];
  block_expert: the expert of each block of block_m rows, < 0 for unused blocks (output undefined).
  config: the tiling; None: ``default_config(N)``.
  """
  config = config or default_config(weights[0].shape[1])
  bm, bk = config.block_m, SCALE_BLOCK
  _check_operands(xq, xs, weights, w_scales, block_expert, bm)
  m, k = xq.shape
  n = weights[0].shape[1]
  wgs, cta_n = config.consumers, config.cta_n
  if n % cta_n:
    raise ValueError(f"N = {n} must be a multiple of {cta_n} (the CTA's columns: {wgs} warpgroup(s) with block_n "
                     f"= {config.block_n}, block_m = {bm})")
  wg_m, scale_blocks = 64, config.block_n // bk  # a warpgroup's rows; its weight-scale blocks (one wgmma each)
  n_weights, n_blocks_m, n_blocks_n, k_steps = len(weights), m // bm, n // cta_n, k // bk
  staging_bytes = wgs * wg_m * bk * jnp.dtype(out_dtype).itemsize
  steps = min(config.max_concurrent_steps, (SMEM_BYTES - staging_bytes) // ((bm + cta_n) * bk))  # e4m3 tiles
  xs_t = xs.astype(jnp.float32).T  # [K/128, M]: a row block's scales of one K step are contiguous
  tiled = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  in_specs = [
      plgpu.BlockSpec((bm, bk), lambda s: (0, s), transforms=tiled),
      plgpu.BlockSpec((cta_n, bk), lambda s: (0, s), transforms=tiled),
      plgpu.BlockSpec((1, bm), lambda s: (s, 0)),
  ]

  def tile_position(t):
    """(row block, column block) of the t-th CTA (the fastest-varying grid axis)."""
    if not config.group_m:
      return t % n_blocks_m, t // n_blocks_m
    per_group = config.group_m * n_blocks_n
    first_m = t // per_group * config.group_m
    group_rows = jnp.minimum(n_blocks_m - first_m, config.group_m)  # the last group may be short
    within = t % per_group
    return first_m + within % group_rows, within // group_rows

  def kernel(block_expert_gmem, xs_gmem, x_gmem, *refs):
    w_gmems, ws_gmems = refs[:n_weights], refs[n_weights:2 * n_weights]
    out_gmem, o_smem = refs[2 * n_weights:]
    wi = lax.axis_index("w")
    mi, ni = tile_position(lax.axis_index("tile"))
    wg = lax.axis_index("wg") if wgs > 1 else 0
    wg_row, wg_col = (wg, 0) if config.row_groups > 1 else (0, wg)  # this warpgroup's place in the CTA's tile
    expert = block_expert_gmem[mi]
    first_col_block = (ni * cta_n + wg_col * config.block_n) // bk  # its first weight-scale block of columns

    def step(ws_gmem, idx, x_smem, w_smem, xs_smem, acc):
      x_rows = x_smem.at[pl.ds(wg_row * wg_m, wg_m)] if config.row_groups > 1 else x_smem
      # The step's scales, per row: x's block scale times each weight block's (loaded before the wgmma waits)
      row_scale = xs_smem[0, pl.ds(wg_row * wg_m, wg_m)]
      scales = [row_scale * ws_gmem[expert, first_col_block + j, idx[0]] for j in range(scale_blocks)]
      out = []
      for j in range(scale_blocks):
        w_cols = w_smem.at[pl.ds((wg_col * scale_blocks + j) * bk, bk)] if cta_n > bk else w_smem

        def product(tmp_ref):  # this K step's x . w^T over 128 columns, FP8 operands, float32 accumulation
          plgpu.wgmma(tmp_ref, x_rows, w_cols.T)
          return plgpu.wgmma_accumulator_load(tmp_ref)
        partial = pl.run_scoped(product, plgpu.ACC((wg_m, bk), jnp.float32))
        out.append(acc[j] + partial * lax.broadcast_in_dim(scales[j], (wg_m, bk), [0]))
      return tuple(out)

    def epilogue(acc):
      rows = pl.ds(mi * bm + wg_row * wg_m, wg_m)
      for j, part in enumerate(acc):  # 128 columns at a time through this warpgroup's staging tile
        if j:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem.at[wg][...] = part.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[wi, rows, pl.ds((first_col_block + j) * bk, bk)])
      plgpu.wait_smem_to_gmem(0)

    def zeros():
      return tuple(plgpu.layout_cast(jnp.zeros((wg_m, bk), jnp.float32), plgpu.Layout.WGMMA)
                   for _ in range(scale_blocks))

    def tile(w_gmem, ws_gmem):
      operands = (x_gmem.at[pl.ds(mi * bm, bm)], w_gmem.at[expert, pl.ds(ni * cta_n, cta_n)],
                  xs_gmem.at[:, pl.ds(mi * bm, bm)])
      body = functools.partial(step, ws_gmem)
      if wgs == 1:
        epilogue(plgpu.emit_pipeline(body, grid=(k_steps,), in_specs=in_specs,
                                     max_concurrent_steps=steps, init_carry=zeros())(*operands))
        return
      plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_steps,), in_specs=in_specs, memory_registers=40, wg_axis="wg", num_compute_wgs=wgs,
          max_concurrent_steps=steps,
          compute_context=lambda run_pipeline: epilogue(run_pipeline(zeros())),
      )(*operands)

    for which in range(n_weights):  # one pipeline per weight array (a ref cannot be chosen at run time)
      @pl.when((expert >= 0) & (wi == which))
      def _tile():
        tile(w_gmems[which], ws_gmems[which])

  threads = {} if wgs == 1 else {"num_threads": wgs + 1, "thread_name": "wg"}
  run = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n_weights, m, n), out_dtype),
      scratch_types=[plgpu.SMEM((wgs, wg_m, bk), out_dtype)],
      grid=(n_weights, n_blocks_m * n_blocks_n),
      grid_names=("w", "tile"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      **threads,
  )
  return run(block_expert.astype(jnp.int32), xs_t, xq, *weights, *(s.astype(jnp.float32) for s in w_scales))


def dense_gemm_fp8(x: Float[Array, "... k"], w: Float[Array, "n k"], w_scale: Float[Array, "nb kb"], out_dtype,
                   interpret: bool = False, config: GroupedGemmConfig | None = None) -> Float[Array, "... n"]:
  """A block-scaled FP8 linear, ``x @ W^T`` with W = w * w_scale per 128x128 block: the official
  ``act_quant`` + ``fp8_gemm`` (x quantised per 1x128 block with ue8m0 scales), as the grouped GEMM with
  a single group. Rows are padded to the tile's block_m and N to the CTA's columns (wkv_a's 576 outputs
  become 640 with the default tilings: that pad copies its 4 MB weight at each call, small beside a decode
  step's other weight reads). config: the tiling; None: ``dense_config(M, N padded to 128)``.
  """
  *lead, k = x.shape
  n = w.shape[0]
  rows = x.reshape(-1, k)
  m = rows.shape[0]
  xq, xs = quant.act_quant(rows)
  config = config or dense_config(m, -(-n // SCALE_BLOCK) * SCALE_BLOCK)
  n_pad = -(-n // config.cta_n) * config.cta_n
  m_pad = -(-m // config.block_m) * config.block_m
  xq, xs = jnp.pad(xq, ((0, m_pad - m), (0, 0))), jnp.pad(xs, ((0, m_pad - m), (0, 0)))
  w = jnp.pad(w, ((0, n_pad - n), (0, 0)))  # zero rows: the padded columns come out zero
  w_scale = jnp.pad(w_scale, ((0, n_pad // SCALE_BLOCK - w_scale.shape[0]), (0, 0)), constant_values=1.0)
  block_expert = jnp.zeros((m_pad // config.block_m,), jnp.int32)
  out = grouped_gemm_fp8(xq, xs, (w[None],), (w_scale[None],), block_expert, config, out_dtype, interpret)[0]
  return out[:m, :n].reshape(*lead, n)


def grouped_gemm_fp8_reference(xq: Float[Array, "m k"], xs: Float[Array, "m kb"],
                               weights: tuple[Float[Array, "e n k"], ...], w_scales: tuple[Float[Array, "e nb kb"], ...],
                               block_expert: Int[Array, "blocks"], block_m: int = DEFAULT_CONFIG.block_m,
                               out_dtype=jnp.bfloat16) -> Float[Array, "w m n"]:
  """The same products from the dequantised operands (exact: e4m3 x power-of-two scales), float32 sums.

  The block-aligned layout is a ragged one whose group sizes are the padded sizes; rows of unused
  blocks come out as zeros here.
  """
  from pallas_kernels.dispatch import grouped_matmul_reference
  n_experts = weights[0].shape[0]
  x = quant.act_dequant(xq, xs)
  used = jnp.where(block_expert >= 0, block_expert, n_experts)  # unused blocks: out of range, dropped
  blocks_per_expert = jnp.zeros(n_experts, jnp.int32).at[used].add(1, mode="drop")
  sizes = blocks_per_expert * block_m
  return jnp.stack([grouped_matmul_reference(x, quant.dequant_weight(w, s, jnp.float32), sizes).astype(out_dtype)
                    for w, s in zip(weights, w_scales)])
