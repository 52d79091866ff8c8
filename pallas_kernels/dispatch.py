"""Picks the implementation of each hot operation by backend; tests and benchmarks can force one.

``impl`` is one of:
- ``"auto"``: the fastest implementation that supports the backend and the shapes;
- ``"reference"``: the plain-JAX reference (what the kernels are tested against);
- ``"pallas"``: the Pallas kernel, or a clear error when it cannot run here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv32_jax import indexer as indexer_reference

IMPLS = ("auto", "reference", "pallas")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl = {impl!r}: expected one of {IMPLS}")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


@dataclasses.dataclass(frozen=True)
class RaggedDotMgpuConfig:
  """Tiling of JAX's Mosaic GPU ``ragged_dot`` (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 2

  def supports(self, m: int, n: int, k: int, dtype) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and k % self.block_k == 0 and n % self.block_n == 0 and m >= 1)


RAGGED_DOT_MGPU = RaggedDotMgpuConfig()


def grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g n k"], group_sizes: Int[Array, "g"],
                   impl: str = "auto") -> Float[Array, "m n"]:
  """out[r] = x[r] @ w[g(r)].T for rows sorted by group (group g owns group_sizes[g] consecutive rows).

  Rows past sum(group_sizes) are zero. Output in x's dtype, accumulated in float32. On GPU the
  portable ``jax.lax.ragged_dot`` is expanded by XLA into a dense product over all groups (1-3
  TFLOP/s at the 671B shapes), so there JAX's own Mosaic GPU kernel ``ragged_dot_mgpu`` is used
  until this project's FP8 grouped GEMM replaces it.
  """
  _check_impl(impl)
  m, k = x.shape
  n = w.shape[1]
  use_mgpu = impl == "pallas" or (impl == "auto" and on_gpu() and RAGGED_DOT_MGPU.supports(m, n, k, x.dtype))
  if use_mgpu:
    if not on_gpu():
      raise RuntimeError("grouped_matmul(impl='pallas'): the Mosaic GPU kernel needs a GPU backend")
    return _ragged_dot_mgpu(x, w.astype(x.dtype), group_sizes)
  return grouped_matmul_reference(x, w, group_sizes)


def grouped_matmul_reference(x: Float[Array, "m k"], w: Float[Array, "g n k"],
                             group_sizes: Int[Array, "g"]) -> Float[Array, "m n"]:
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  lhs, rhs = x, w.astype(x.dtype)
  if jax.default_backend() == "cpu" and lhs.dtype == jnp.bfloat16:  # no bf16 x bf16 -> f32 dot on CPU (exact)
    lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  out = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                   preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=())
def _ragged_dot_mgpu(x, w, group_sizes):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  c = RAGGED_DOT_MGPU
  return ragged_dot_mgpu.ragged_dot(
      x, w, group_sizes=group_sizes.astype(jnp.int32), block_m=c.block_m, block_n=c.block_n,
      block_k=c.block_k, max_concurrent_steps=c.max_concurrent_steps, grid_block_n=c.grid_block_n,
      transpose_rhs=True)


def index_logits(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                 k_scale: Float[Array, "b t"], positions: Int[Array, "b s"], impl: str = "auto") -> Float[Array, "b s t"]:
  """Lightning-indexer logits, -inf where key > position. GPU + e4m3 operands: the Mosaic GPU kernel."""
  _check_impl(impl)
  fp8 = q.dtype == jnp.float8_e4m3fn and k.dtype == jnp.float8_e4m3fn
  kernel_ok = fp8 and q.shape[-1] % 32 == 0 and q.shape[-2] % 8 == 0
  if impl == "pallas" or (impl == "auto" and on_gpu() and kernel_ok):
    if not kernel_ok:
      raise ValueError(f"index_logits(impl='pallas') needs e4m3 q and k (got {q.dtype}, {k.dtype}) with head dim a "
                       "multiple of 32 and heads a multiple of 8")
    from pallas_kernels.indexer_logits_mgpu import index_logits_mgpu
    return index_logits_mgpu(q, w, k, k_scale, positions, interpret=not on_gpu())
  visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
  return indexer_reference.index_logits(q, w, k, k_scale, visible)


def topk(logits: Float[Array, "... t"], k: int, lengths: Int[Array, "..."] | None = None,
         impl: str = "auto") -> Int[Array, "... k"]:
  """Exact top-k indices per row (ties to the lower index; -1 for -inf values). GPU: threshold + compaction.

  lengths (optional): each row's values from lengths on are -inf (causal and decode rows), which the
  GPU kernel then never reads.
  """
  _check_impl(impl)
  if impl == "pallas" or (impl == "auto" and on_gpu()):
    from pallas_kernels.topk_gpu import topk_gpu
    rows = logits.reshape(-1, logits.shape[-1])
    row_lengths = None if lengths is None else lengths.reshape(-1)
    return topk_gpu(rows, k, row_lengths, interpret=not on_gpu()).reshape(*logits.shape[:-1], k)
  return indexer_reference.select_topk(logits, k)
