"""Lightning-indexer logits on Hopper: FP8 wgmma, ReLU and head weighting fused (Pallas Mosaic GPU).

Computes, for every query t and key s of one sequence,

  I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q8[t, h] . k8[s])     if s <= position[t], else -inf

which is ``dsv32_jax.indexer.index_logits`` (the reference) with the causal mask given as positions.
The ``[queries, heads, keys]`` intermediate never leaves registers: XLA's einsum writes it to HBM
and reaches ~44 TFLOP/s on an H100 (../shared/anchors.md).

Work decomposition. A CTA owns ``block_q`` queries of one sequence and a contiguous range of key
tiles (``kv_splits`` CTAs share a row, so that a decode batch of one still fills the GPU). The
queries' e4m3 vectors (block_q x 64 heads x 128, as (query, head) rows) stay in shared memory; key
tiles of ``block_kv`` keys stream through a TMA pipeline. For each key tile and each group of
``queries_per_wgmma`` queries, one wgmma computes ``acc[keys, (query, head)] = k8_tile @ q8^T`` (both
operands K-major, as FP8 wgmma requires) with float32 accumulation; the epilogue applies ReLU,
multiplies by each query's head weights, sums over its heads and scales by the keys' scales -- all on
the accumulator registers -- and writes one float32 row segment per query. Two queries a wgmma (N =
128) read each key tile from shared memory half as often per FLOP, which pays at long contexts
(``default_config``). Tried and dropped (H200, BENCHMARKS.md): warp specialisation with 2-3 consumer
warpgroups sharing each key tile (every tiling slower; 4 consumers hung), N = 256.
Key tiles past the last visible key of the CTA's queries are not loaded: their outputs are -inf, or
are left unwritten with ``fill_invisible=False`` -- for a consumer that reads each row only up to its
query's position (the top-k with lengths), which then skips writing half of a prefill's [queries, keys]
float32 matrix (32 GB over a 128K prompt's query blocks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from dsv32_jax.indexer import index_logits as reference  # noqa: F401  (the reference this kernel matches)

FP8 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class IndexerLogitsConfig:
  """Tiling of the Mosaic GPU indexer-logits kernel."""

  block_q: int = 2              # queries per CTA (one wgmma each per key tile); 2 measured best on H100
  block_kv: int = 128           # keys per tile (the wgmma M dimension; a multiple of 64)
  kv_splits: int | None = None  # CTAs per query block along the keys; None: enough to fill the GPU
  max_concurrent_steps: int = 3  # depth of the key-tile TMA pipeline
  overlap: bool = True          # products in pairs: the second one's wgmma runs during the first's epilogue
  queries_per_wgmma: int = 1    # queries whose heads form one wgmma's N (queries x heads <= 256): each key
                                # tile read from shared memory serves more FLOPs

  def __post_init__(self):
    if self.block_kv % 64:
      raise ValueError(f"block_kv = {self.block_kv} must be a multiple of 64")
    if self.block_q < 1:
      raise ValueError(f"block_q = {self.block_q} must be positive")
    if self.queries_per_wgmma < 1 or self.block_q % self.queries_per_wgmma:
      raise ValueError(f"queries_per_wgmma = {self.queries_per_wgmma} must divide block_q = {self.block_q}")


# Measured on an H200 (BENCHMARKS.md, session 22): for 2048 queries at the end of a context, two queries'
# heads in one wgmma (N = 128) over 128-key tiles, one product at a time, run 5.23 ms at 128K against
# 5.78 for a query per wgmma (835 vs 755 TFLOP/s), tie at 32K and lose at 4K (0.43 vs 0.34 ms).
SHORT_CONTEXT_CONFIG = IndexerLogitsConfig(block_q=2, block_kv=128)
LONG_CONTEXT_CONFIG = IndexerLogitsConfig(block_q=4, block_kv=128, queries_per_wgmma=2, overlap=False)
LONG_CONTEXT = 32768  # keys from which LONG_CONTEXT_CONFIG is the default


def default_config(keys: int) -> IndexerLogitsConfig:
  """The tiling for a cache of this many keys (see the figures above)."""
  return LONG_CONTEXT_CONFIG if keys >= LONG_CONTEXT else SHORT_CONTEXT_CONFIG


NUM_SMS = 132  # H100 / H200 SXM


def _kv_splits(config: IndexerLogitsConfig, n_ctas: int, n_tiles: int) -> int:
  if config.kv_splits is not None:
    return max(1, min(config.kv_splits, n_tiles))
  return max(1, min(n_tiles, -(-2 * NUM_SMS // max(n_ctas, 1))))


def index_logits_mgpu(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                      k_scale: Float[Array, "b t"], positions: Int[Array, "b s"],
                      config: IndexerLogitsConfig | None = None, interpret: bool = False,
                      fill_invisible: bool = True) -> Float[Array, "b s t"]:
  """Indexer logits [B, S, T] (float32, -inf where key > position) from e4m3 q [B,S,H,D] and k [B,T,D].

  A CTA loads key tiles up to the largest position of its queries, so work follows the causal
  triangle when neighbouring queries have neighbouring positions (prefill chunks, decode).
  ``fill_invisible=False``: the key tiles past the last visible key of a CTA's queries are not written
  (their values are whatever the buffer held); keys past a query's position inside the tiles that are
  computed are still -inf.
  """
  b, s, h, d = q.shape
  t = k.shape[1]
  config = config or default_config(t)
  if q.dtype != FP8 or k.dtype != FP8:
    raise TypeError(f"index_logits_mgpu takes e4m3 q and k, got {q.dtype} and {k.dtype}")
  if d % 32 or h % 8:
    raise ValueError(f"head dim {d} must be a multiple of 32 and heads {h} of 8 (FP8 wgmma shapes)")
  bq, bkv = min(config.block_q, s), config.block_kv  # decode: no padded queries
  g = config.queries_per_wgmma if bq % config.queries_per_wgmma == 0 else 1  # queries per product
  if g * h > 256:
    raise ValueError(f"queries_per_wgmma = {g} x {h} heads exceeds the wgmma's N of 256")
  s_pad, t_pad = -(-s // bq) * bq, -(-t // bkv) * bkv
  if s_pad != s:  # padded queries repeat the last position (no extra key tiles) and are dropped again
    q = jnp.pad(q, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    w = jnp.pad(w, ((0, 0), (0, s_pad - s), (0, 0)))
    positions = jnp.pad(positions, ((0, 0), (0, s_pad - s)), mode="edge")
  if t_pad != t:  # padded keys are never visible: positions < t
    k = jnp.pad(k, ((0, 0), (0, t_pad - t), (0, 0)))
    k_scale = jnp.pad(k_scale, ((0, 0), (0, t_pad - t)))
  n_q_blocks, n_tiles = s_pad // bq, t_pad // bkv
  splits = _kv_splits(config, b * n_q_blocks, n_tiles)
  tiles_per_split = -(-n_tiles // splits)
  steps = config.max_concurrent_steps
  # Key tiles each query block needs: up to its largest position.
  last_pos = positions.reshape(b, n_q_blocks, bq).max(axis=-1)
  needed_tiles = jnp.clip(last_pos // bkv + 1, 0, n_tiles).astype(jnp.int32)

  def kernel(needed_gmem, pos_gmem, q_gmem, w_gmem, k_gmem, ks_gmem, out_gmem, q_smem, w_smem, o_smem, fill_smem,
             barrier):
    bi, qi, si = lax.axis_index("b"), lax.axis_index("q"), lax.axis_index("kv")
    q0 = qi * bq
    plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(q0 * h, bq * h)], q_smem, barrier)
    plgpu.copy_gmem_to_smem(w_gmem.at[bi, pl.ds(q0, bq)], w_smem, barrier)
    plgpu.barrier_wait(barrier)
    first = si * tiles_per_split
    last = jnp.minimum(first + tiles_per_split, n_tiles)
    needed = needed_gmem[bi, qi]
    compute_end = jnp.clip(needed, first, last)

    def tile_body(idx, k_smem, ks_smem):
      tile = first + idx[0]
      slot = lax.rem(idx[0], 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy out of this slot two tiles ago is done
      key_ids = tile * bkv + plgpu.broadcasted_iota(jnp.int32, (bkv,), 0)
      k_scales = ks_smem[...]

      def epilogue(acc, first_query):  # acc[keys, (query, head)] of g queries
        for j in range(g):
          i = first_query + j
          scores = jnp.maximum(acc[:, j * h:(j + 1) * h] if g > 1 else acc, 0.0)
          scores = scores * lax.broadcast_in_dim(w_smem[i], (bkv, h), [1])
          row = jnp.sum(scores, axis=1) * k_scales
          o_smem[slot, i] = jnp.where(key_ids <= pos_gmem[bi, q0 + i], row, -jnp.inf)

      def product_group(first_query, acc_refs):  # one wgmma per g queries: acc[keys, (query, head)] = k8 @ q8^T
        for j, ref in enumerate(acc_refs):
          plgpu.wgmma(ref, k_smem, q_smem.at[pl.ds((first_query + j * g) * h, g * h)].T)
        for j, ref in enumerate(acc_refs):  # the epilogue of product j overlaps the wgmma of product j+1
          epilogue(plgpu.wgmma_accumulator_load(ref, wait_n=len(acc_refs) - 1 - j), first_query + j * g)

      group = 2 if config.overlap else 1  # products in flight
      for first_query in range(0, bq, group * g):
        n = min(group, (bq - first_query) // g)
        pl.run_scoped(functools.partial(product_group, first_query), [plgpu.ACC((bkv, g * h), jnp.float32)] * n)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[slot], out_gmem.at[bi, pl.ds(q0, bq), pl.ds(tile * bkv, bkv)])

    @pl.when(compute_end > first)
    def _compute():
      plgpu.emit_pipeline(
          tile_body,
          grid=(compute_end - first,),
          in_specs=[
              plgpu.BlockSpec((bkv, d), lambda j: (first + j, 0),
                              transforms=(plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))),
              plgpu.BlockSpec((bkv,), lambda j: (first + j,)),
          ],
          max_concurrent_steps=steps,
      )(k_gmem.at[bi], ks_gmem.at[bi])

    if fill_invisible:  # tiles no query of this block can see: -inf, without loading their keys
      fill_smem[...] = jnp.full(fill_smem.shape, -jnp.inf, jnp.float32)
      plgpu.commit_smem()

      @pl.loop(compute_end, last)
      def _fill(tile):
        plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, bq)], out_gmem.at[bi, pl.ds(q0, bq), pl.ds(tile * bkv, bkv)])
    plgpu.wait_smem_to_gmem(0)

  unit = 256 // math.gcd(256, bkv)  # a constant store takes a multiple of 256 values
  fill_rows = -(-bq // unit) * unit
  qd_transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  run = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((b, s_pad, t_pad), jnp.float32),
      scratch_types=[
          plgpu.SMEM((bq * h, d), FP8, transforms=qd_transforms),  # (query, head) rows
          plgpu.SMEM((bq, h), jnp.float32),
          plgpu.SMEM((2, bq, bkv), jnp.float32),
          plgpu.SMEM((fill_rows, bkv), jnp.float32),
          plgpu.Barrier(num_arrivals=2),
      ],
      grid=(b, n_q_blocks, splits),
      grid_names=("b", "q", "kv"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  out = run(needed_tiles, positions.astype(jnp.int32), q.reshape(b, s_pad * h, d), w.astype(jnp.float32), k,
            k_scale.astype(jnp.float32))
  return out[:, :s, :t]
