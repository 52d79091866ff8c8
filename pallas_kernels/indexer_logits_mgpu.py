"""Lightning-indexer logits on Hopper: FP8 wgmma, ReLU and head weighting fused (Pallas Mosaic GPU).

Computes, for every query t and key s of one sequence,

  I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q8[t, h] . k8[s])     if s <= position[t], else -inf

which is ``dsv32_jax.indexer.index_logits`` (the reference) with the causal mask given as positions.
The ``[queries, heads, keys]`` intermediate never leaves registers: XLA's einsum writes it to HBM
and reaches ~44 TFLOP/s on an H100 (../shared/anchors.md).

Work decomposition. A CTA owns ``block_q`` queries of one sequence and a contiguous range of key
tiles (``kv_splits`` CTAs share a row, so that a decode batch of one still fills the GPU). The
queries' e4m3 vectors (block_q x 64 heads x 128) stay in shared memory; key tiles of ``block_kv``
keys stream through a TMA pipeline. For each key tile and query, one wgmma computes
``acc[keys, heads] = k8_tile @ q8[t]^T`` (both operands K-major, as FP8 wgmma requires) with float32
accumulation; the epilogue applies ReLU, multiplies by the query's head weights, sums over heads and
scales by the keys' scales -- all on the accumulator registers -- and writes one float32 row segment.
Key tiles past the last visible key of the CTA's queries are not loaded: their outputs are -inf.
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

from dsv32_jax.indexer import index_logits as reference  # noqa: F401  (the reference this kernel matches)

FP8 = jnp.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class IndexerLogitsConfig:
  """Tiling of the Mosaic GPU indexer-logits kernel."""

  block_q: int = 2              # queries per CTA (one wgmma each per key tile); 2 measured best on H100
  block_kv: int = 128           # keys per tile (the wgmma M dimension; a multiple of 64)
  kv_splits: int | None = None  # CTAs per query block along the keys; None: enough to fill the GPU
  max_concurrent_steps: int = 3  # depth of the key-tile TMA pipeline
  overlap: bool = True          # queries in pairs: the second one's wgmma runs during the first's epilogue

  def __post_init__(self):
    if self.block_kv % 64:
      raise ValueError(f"block_kv = {self.block_kv} must be a multiple of 64")
    if self.block_q < 1:
      raise ValueError(f"block_q = {self.block_q} must be positive")


NUM_SMS = 132  # H100 / H200 SXM


def _kv_splits(config: IndexerLogitsConfig, n_ctas: int, n_tiles: int) -> int:
  if config.kv_splits is not None:
    return max(1, min(config.kv_splits, n_tiles))
  return max(1, min(n_tiles, -(-2 * NUM_SMS // max(n_ctas, 1))))


def index_logits_mgpu(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                      k_scale: Float[Array, "b t"], positions: Int[Array, "b s"],
                      config: IndexerLogitsConfig = IndexerLogitsConfig(), interpret: bool = False
                      ) -> Float[Array, "b s t"]:
  """Indexer logits [B, S, T] (float32, -inf where key > position) from e4m3 q [B,S,H,D] and k [B,T,D].

  A CTA loads key tiles up to the largest position of its queries, so work follows the causal
  triangle when neighbouring queries have neighbouring positions (prefill chunks, decode).
  """
  b, s, h, d = q.shape
  t = k.shape[1]
  if q.dtype != FP8 or k.dtype != FP8:
    raise TypeError(f"index_logits_mgpu takes e4m3 q and k, got {q.dtype} and {k.dtype}")
  if d % 32 or h % 8:
    raise ValueError(f"head dim {d} must be a multiple of 32 and heads {h} of 8 (FP8 wgmma shapes)")
  bq, bkv = min(config.block_q, s), config.block_kv  # decode: no padded queries
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
    plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(q0, bq)], q_smem, barrier)
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
      def epilogue(acc, i):
        weights = w_smem[i]
        scores = jnp.maximum(acc, 0.0) * lax.broadcast_in_dim(weights, (bkv, h), [1])
        row = jnp.sum(scores, axis=1) * k_scales
        o_smem[slot, i] = jnp.where(key_ids <= pos_gmem[bi, q0 + i], row, -jnp.inf)

      def query_group(first_query, acc_refs):  # one wgmma per query: acc[keys, heads] = k8 @ q8[i]^T
        for j, ref in enumerate(acc_refs):
          plgpu.wgmma(ref, k_smem, q_smem.at[first_query + j].T)
        for j, ref in enumerate(acc_refs):  # the epilogue of query j overlaps the wgmma of query j+1
          epilogue(plgpu.wgmma_accumulator_load(ref, wait_n=len(acc_refs) - 1 - j), first_query + j)

      group = 2 if config.overlap else 1
      for first_query in range(0, bq, group):
        n = min(group, bq - first_query)
        pl.run_scoped(functools.partial(query_group, first_query), [plgpu.ACC((bkv, h), jnp.float32)] * n)
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

    # Tiles no query of this block can see: -inf, without loading their keys.
    fill_smem[...] = jnp.full(fill_smem.shape, -jnp.inf, jnp.float32)
    plgpu.commit_smem()

    @pl.loop(compute_end, last)
    def _fill(tile):
      plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, bq)], out_gmem.at[bi, pl.ds(q0, bq), pl.ds(tile * bkv, bkv)])
    plgpu.wait_smem_to_gmem(0)

  qd_transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  run = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((b, s_pad, t_pad), jnp.float32),
      scratch_types=[
          plgpu.SMEM((bq, h, d), FP8, transforms=qd_transforms),
          plgpu.SMEM((bq, h), jnp.float32),
          plgpu.SMEM((2, bq, bkv), jnp.float32),
          plgpu.SMEM((bq + bq % 2, bkv), jnp.float32),  # a constant store needs a multiple of 128 values
          plgpu.Barrier(num_arrivals=2),
      ],
      grid=(b, n_q_blocks, splits),
      grid_names=("b", "q", "kv"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  out = run(needed_tiles, positions.astype(jnp.int32), q, w.astype(jnp.float32), k, k_scale.astype(jnp.float32))
  return out[:, :s, :t]
