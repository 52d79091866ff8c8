"""Picks the implementation of each hot operation by backend; tests and benchmarks can force one.

``impl`` is one of:
- ``"auto"``: the fastest implementation that supports the backend and the shapes;
- ``"reference"``: the plain-JAX reference (what the kernels are tested against);
- ``"pallas"``: the Pallas kernel, or a clear error when it cannot run here.

DeepSeek Sparse Attention (``index_logits``, ``topk``, ``sparse_mla``): ``"auto"`` runs the Pallas
Mosaic TPU kernels on a TPU, the GPU kernels on a GPU where one exists for the operation and the
operands (the Mosaic GPU indexer logits for e4m3 operands, the top-k kernel, the sparse MLA kernel for
bf16 operands whose latent and rope dims are powers of two), and the reference elsewhere; ``"pallas"``
insists on the kernel: on a GPU it also runs the sparse MLA kernel in float32, and on the CPU it runs
the *TPU kernels in Pallas TPU interpret mode* (the CPU stands in for a TPU; the GPU kernels' CPU tests
call them in Mosaic GPU / Triton interpret mode directly).

Block-scaled FP8 matrices (``fp8_experts_backend`` for the routed experts, ``fp8_linear_backend`` for every
other FP8 linear): the Mosaic GPU grouped FP8 GEMM on a GPU -- the linears only for bf16 / fp16
activations under ``"auto"``, so that float32 runs stay exact -- and the reference's products of the
dequantised operands elsewhere; ``"pallas"`` off a GPU runs the kernel in Mosaic GPU interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IMPLS = ("auto", "reference", "pallas")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl = {impl!r}: expected one of {IMPLS}")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (sm_90: wgmma, the Mosaic GPU kernels' target)."""
  return on_gpu() and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


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


def fp8_experts_backend(impl: str, fp8_weights: bool, dims: tuple[int, ...]) -> str | None:
  """How the routed experts run: through ``pallas_kernels.grouped_gemm_fp8_mgpu`` -- ``"gpu"``
  (compiled) or ``"interpret"`` (Mosaic GPU interpret mode, for ``impl="pallas"`` off a GPU) -- or
  ``None``: the ragged ``grouped_matmul`` over dequantised weights (the reference path).

  The kernel takes the release's FP8 experts (e4m3 + 128x128 block scales) with every matrix
  dimension a multiple of 128.
  """
  _check_impl(impl)
  if impl == "reference" or not fp8_weights:
    return None
  if any(d % 128 for d in dims):
    if impl == "pallas":
      raise ValueError(f"grouped FP8 GEMM (impl='pallas'): expert dimensions {dims} must be multiples of 128")
    return None
  if on_gpu():
    return "gpu"
  return "interpret" if impl == "pallas" else None


def fp8_linear_backend(impl: str, fp8_weight: bool, in_features: int, dtype) -> str | None:
  """How a block-scaled FP8 linear runs: through ``grouped_gemm_fp8_mgpu.dense_gemm_fp8`` (``"gpu"``, or
  ``"interpret"`` for ``impl="pallas"`` off a GPU), or ``None``: the reference's product of the dequantised
  operands (``dsv32_jax.layers.linear_operands``). The kernel needs the input features to be a multiple of
  128; any output count is padded.

  ``"auto"`` takes the kernel for bf16 / fp16 activations only: float32 runs stay on the reference for
  exact comparisons (FP8 tensor cores accumulate in less than float32, and the indexer's e4m3 rounding
  after the projections turns such differences into different top-k sets). ``"pallas"`` forces it (in
  interpret mode on a CPU); on a TPU the linears always stay on the reference.
  """
  if on_tpu() or (impl == "auto" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    return None  # a TPU has no FP8 GEMM kernel here: its linears stay on XLA
  if impl == "pallas" and fp8_weight and in_features % 128:
    raise ValueError(f"FP8 linear (impl='pallas'): {in_features} input features, expected a multiple of 128")
  return fp8_experts_backend(impl, fp8_weight, (in_features,))


# --- Dense attention in MLA's MHA form (the official prefill) -------------------------------------


MASKED_MHA_BY_DEFAULT = True  # "auto" takes the masked-attention kernel over cuDNN on Hopper (1.74 vs 5.60 ms at 4K, H100)


def fused_mha_implementation(dtype, head_dim: int, impl: str = "auto", v_head_dim: int | None = None) -> str | None:
  """How the official prefill's MHA form (keys and values per head, the top-k set as a mask) attends
  without materialising [queries, heads, keys]: ``"mgpu"`` (``pallas_kernels.masked_mha_mgpu``, the top-k
  as bits), ``"interpret"`` (the same kernel in Mosaic GPU interpret mode), ``"cudnn"`` (cuDNN's fused
  flash attention through ``jax.nn.dot_product_attention``, the mask as a bias it reads for every tile),
  or None for the reference's einsums and softmax.

  On a GPU in bf16 / fp16 ``"auto"`` takes cuDNN for head dims it supports (or the kernel on Hopper where
  ``MASKED_MHA_BY_DEFAULT``); ``"pallas"`` takes the kernel wherever it supports the operands (bf16, head
  dims multiples of 64; v_head_dim defaults to head_dim) on Hopper, in interpret mode off a GPU. float32 runs stay
  on the reference (exact comparisons).
  """
  _check_impl(impl)
  from pallas_kernels import masked_mha_mgpu
  kernel = masked_mha_mgpu.supports(head_dim, v_head_dim or head_dim, dtype)
  if impl == "pallas" and kernel and (on_hopper() or not on_gpu()):  # wgmma: Hopper only
    return "mgpu" if on_gpu() else "interpret"
  if impl == "reference" or not on_gpu() or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return None
  if kernel and on_hopper() and impl == "auto" and MASKED_MHA_BY_DEFAULT:
    return "mgpu"
  return "cudnn" if head_dim % 8 == 0 and head_dim <= 256 else None


# --- DeepSeek Sparse Attention: lightning-indexer logits, top-k selection, sparse MLA ------------


def _dsa_backend(op: str, impl: str, gpu_kernel: bool) -> str:
  """"reference", "gpu" or "tpu" (a Pallas Mosaic TPU kernel: compiled on a TPU, interpreted on a CPU).

  gpu_kernel: whether a GPU kernel exists for this operation and these operands.
  """
  _check_impl(impl)
  if impl == "reference":
    return "reference"
  if on_gpu():
    if gpu_kernel:
      return "gpu"
    if impl == "pallas":
      raise NotImplementedError(f"{op}(impl='pallas'): no GPU kernel for this operation and these operands; "
                                "use impl='auto' or 'reference'")
    return "reference"
  if impl == "auto" and not on_tpu():
    return "reference"
  return "tpu"


def _mxu_takes_e4m3() -> bool:
  """Whether this TPU's MXU multiplies e4m3 x e4m3 (TPU7x does; v5e/v5p/v6e do not)."""
  if not on_tpu():
    return False
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.get_tpu_info().is_matmul_supported(jnp.float8_e4m3fn, jnp.float8_e4m3fn)


def _index_logits_backend(q, k, impl: str) -> str:
  fp8 = q.dtype == jnp.float8_e4m3fn and k.dtype == jnp.float8_e4m3fn
  return _dsa_backend("index_logits", impl, gpu_kernel=fp8 and q.shape[-1] % 32 == 0 and q.shape[-2] % 8 == 0)


def _sparse_mla_backend(q_lat_dtype, c: int, r: int, impl: str) -> str:
  # On an H100 the kernel measured 1.5-1.7x XLA's gather + einsum in prefill and 1.0-1.6x in decode at
  # batch 1-128 (BENCHMARKS.md, sparse MLA), so "auto" takes it wherever its Triton blocks fit the dims,
  # in bf16 (float32 runs are exact comparisons: "auto" keeps the reference for them, "pallas" forces it).
  from pallas_kernels.sparse_mla_gpu import supports
  in_bf16 = impl == "pallas" or q_lat_dtype != jnp.float32
  return _dsa_backend("sparse_mla", impl, gpu_kernel=supports(c, r) and in_bf16)


def index_logits_runs_kernel(index_q, index_k, impl: str = "auto") -> bool:
  """Whether ``index_logits`` runs a kernel for these operands: a block of queries then holds only its
  float32 [queries, keys] logits (the reference holds [queries, heads, keys])."""
  return _index_logits_backend(index_q, index_k, impl) != "reference"


def gathered_dsa_runs_kernels(index_q, index_k, q_lat_dtype, c: int, r: int, impl: str = "auto") -> bool:
  """Whether the indexer logits and the sparse MLA both run kernels for these operands (GPU or TPU).

  Then a block of queries holds no [queries, heads, keys] intermediate -- only its float32 logits
  [queries, keys] -- so the model can score and attend in larger blocks (``RunOptions.kernel_query_chunk``).
  """
  return (index_logits_runs_kernel(index_q, index_k, impl)
          and _sparse_mla_backend(q_lat_dtype, c, r, impl) != "reference")


def index_logits(q: Float[Array, "b s h d"], w: Float[Array, "b s h"], k: Float[Array, "b t d"],
                 k_scale: Float[Array, "b t"], positions: Int[Array, "b s"], *, impl: str = "auto",
                 config=None, skip_invisible: bool = False) -> Float[Array, "b s t"]:
  """Indexer logits I[b,t,s] = k_scale[s] * sum_h w[t,h] ReLU(q[t,h] . k[s]), float32, -inf where
  key s > positions[b,t] (causal: a query sees the cache slots up to its own position).

  ``skip_invisible``: the logits past a query's position may hold any value where a kernel can skip
  writing them -- for a consumer that reads each row only up to it, as ``topk(..., lengths=positions + 1)``
  does on every backend. The GPU kernel then leaves the key tiles past a query block's last visible key
  unwritten (half of a prefill's float32 [queries, keys] logits); the others still write -inf.

  q, k: e4m3 (the released FP8 indexer) or float; w: float32 with the query scales folded in.
  Reference: ``dsv32_jax.indexer.index_logits``; GPU (e4m3): ``pallas_kernels.indexer_logits_mgpu``
  (``config``: its ``IndexerLogitsConfig``); TPU: ``pallas_kernels.index_logits_tpu`` (``config``: its
  ``IndexLogitsTpuConfig``; by default e4m3 goes to the MXU unwidened where the chip's MXU takes it).
  """
  backend = _index_logits_backend(q, k, impl)
  if backend == "reference":
    from dsv32_jax.indexer import index_logits as reference
    visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
    return reference(q, w, k, k_scale, visible)
  if backend == "gpu":
    from pallas_kernels.indexer_logits_mgpu import index_logits_mgpu
    return index_logits_mgpu(q, w, k, k_scale, positions, **({"config": config} if config else {}),
                             fill_invisible=not skip_invisible)
  from pallas_kernels import index_logits_tpu
  if config is None:
    config = dataclasses.replace(index_logits_tpu.DEFAULT_CONFIG, fp8_matmul=_mxu_takes_e4m3())
  return index_logits_tpu.index_logits(q, w, k, k_scale, positions, config=config)


def topk(logits: Float[Array, "*b t"], k: int, lengths: Int[Array, "*b"] | None = None, *, impl: str = "auto",
         approx_recall: float | None = None, config=None) -> Int[Array, "*b k"]:
  """Indices of the k largest logits of each row, used as a set; -1 fills the slots beyond the
  finite logits. Ties at the k-th value go to the lower index (``jax.lax.top_k``'s rule).

  ``lengths`` (optional, per row): keys at positions >= lengths count as -inf whatever the row holds
  there (no backend reads them into the result), and kernels may skip them (a causal row t passes
  ``position + 1``: half the work of a prefill).

  The order of the indices inside a row is unspecified (reference: by score; TPU kernel: ascending).
  ``approx_recall`` (e.g. 0.95) selects ``jax.lax.approx_max_k`` instead, on every backend: on a TPU
  it may miss keys near the threshold (recall: docs/tpu.md), elsewhere it is exact.
  Reference: ``dsv32_jax.indexer.select_topk``; GPU: ``pallas_kernels.topk_gpu`` (``config``: its
  ``TopkGpuConfig``); TPU: ``pallas_kernels.topk_tpu``.
  """
  if approx_recall is not None:
    from pallas_kernels import topk_tpu
    return topk_tpu.topk_approx(logits, k, lengths, recall_target=approx_recall)
  backend = _dsa_backend("topk", impl, gpu_kernel=True)
  *lead, t = logits.shape
  if backend == "reference":
    from dsv32_jax.indexer import select_topk
    if lengths is not None:
      logits = jnp.where(jnp.arange(t) < lengths[..., None], logits, -jnp.inf)
    return select_topk(logits.reshape(1, -1, t), k).reshape(*lead, k)
  if backend == "gpu":
    from pallas_kernels.topk_gpu import topk_gpu
    rows = logits.reshape(-1, t)
    row_lengths = None if lengths is None else lengths.reshape(-1)
    return topk_gpu(rows, k, row_lengths, **({"config": config} if config else {})).reshape(*lead, k)
  from pallas_kernels import topk_tpu
  return topk_tpu.topk(logits, k, lengths, config=config or topk_tpu.DEFAULT_CONFIG)


TOPK_BITS_BY_DEFAULT = True  # "auto" on a GPU takes topk_bits_gpu over the indices packed (4K, H100: 0.18 vs 0.96 ms)


def topk_bits(logits: Float[Array, "*b t"], k: int, lengths: Int[Array, "*b"] | None = None, *,
              impl: str = "auto", config=None) -> Int[Array, "*b tw"]:
  """``topk``'s set of each row as bits -- bit j % 32 of int32 word j // 32 set iff key j is chosen; ceil(t / 32)
  words a row -- the mask the masked-attention kernel reads (``masked_mha_mgpu.mask_words`` lays rows out for it).

  GPU: ``pallas_kernels.topk_bits_gpu`` (``config``: its ``TopkBitsConfig``), the bits straight from the logits
  with no indices, for rows of at most ``config.block`` values (under ``"auto"`` where ``TOPK_BITS_BY_DEFAULT``);
  longer rows and other backends: ``topk``'s indices (the backend's kernel or the reference) packed
  (``masked_mha_mgpu.index_bits``).
  """
  backend = _dsa_backend("topk_bits", impl, gpu_kernel=True)
  *lead, t = logits.shape
  from pallas_kernels import topk_bits_gpu
  config = config or topk_bits_gpu.DEFAULT_CONFIG
  if backend == "gpu" and config.supports(t) and (impl == "pallas" or TOPK_BITS_BY_DEFAULT):
    rows = logits.reshape(-1, t)
    row_lengths = None if lengths is None else lengths.reshape(-1)
    return topk_bits_gpu.topk_bits_gpu(rows, k, row_lengths, config).reshape(*lead, -1)
  from pallas_kernels.masked_mha_mgpu import index_bits
  return index_bits(topk(logits, min(k, t), lengths, impl=impl), t)


def sparse_mla(q_lat: Float[Array, "b s h c"], q_pe: Float[Array, "b s h r"], kv: Float[Array, "b t c"],
               k_pe: Float[Array, "b t r"], idx: Int[Array, "b s k"], scale: float, *, impl: str = "auto",
               config=None, kv_scale: Float[Array, "b t cb"] | None = None) -> Float[Array, "b s h c"]:
  """MLA in the latent (MQA form) over the rows idx selects (-1: unused slot); output in q_lat's dtype.
  ``kv_scale``: kv is an e4m3 latent cache with a float32 scale per 128 values (the GPU kernel and the
  reference dequantise the selected rows; the TPU kernels get the whole latent dequantised first).

  o[t,h] = softmax_j((q_lat[t,h] . kv[idx[t,j]] + q_pe[t,h] . k_pe[idx[t,j]]) * scale) . kv[idx[t,j]]
  Reference: ``dsv32_jax.mla.sparse_attention_scaled``; GPU: on a Hopper GPU with a bf16 cache
  ``pallas_kernels.sparse_mla_mgpu`` (Mosaic GPU, wgmma; 1.4-1.6x the Triton kernel in prefill on an H100,
  BENCHMARKS.md; ``config``: its ``SparseMlaMgpuConfig``), else ``pallas_kernels.sparse_mla_gpu`` (Triton;
  an FP8 cache, float32, other GPUs, or a ``SparseMlaGpuConfig`` given); TPU: ``pallas_kernels.sparse_mla_tpu``
  (token-granular DMAs), or ``pallas_kernels.sparse_mla_blocks_tpu`` when ``config`` is a ``SparseMlaBlocksTpuConfig`` (64-token
  blocks; indices must be distinct).
  """
  backend = _sparse_mla_backend(q_lat.dtype, kv.shape[-1], k_pe.shape[-1], impl)
  if backend == "gpu":
    from pallas_kernels import sparse_mla_mgpu
    from pallas_kernels.sparse_mla_gpu import SparseMlaGpuConfig, sparse_mla_gpu
    if (kv_scale is None and not isinstance(config, SparseMlaGpuConfig) and on_hopper()
        and sparse_mla_mgpu.supports(kv.shape[-1], k_pe.shape[-1])
        and all(a.dtype == jnp.bfloat16 for a in (q_lat, q_pe, kv, k_pe))):
      return sparse_mla_mgpu.sparse_mla_mgpu(q_lat, q_pe, kv, k_pe, idx, scale,
                                             config or sparse_mla_mgpu.SparseMlaMgpuConfig())[0]
    return sparse_mla_gpu(q_lat, q_pe, kv, k_pe, idx, scale, **({"config": config} if config else {}),
                          kv_scale=kv_scale)[0]
  if backend == "reference":  # dequantises the selected rows only
    from dsv32_jax.mla import sparse_attention_scaled
    return sparse_attention_scaled(scale, q_lat, q_pe, kv, k_pe, idx, kv_scale)
  if kv_scale is not None:  # the TPU kernels read the latent in the activation dtype
    from dsv32_jax.quant import act_dequant
    kv = act_dequant(kv, kv_scale, q_lat.dtype)
  from pallas_kernels import sparse_mla_blocks_tpu, sparse_mla_tpu
  if isinstance(config, sparse_mla_blocks_tpu.SparseMlaBlocksTpuConfig):
    return sparse_mla_blocks_tpu.sparse_mla_blocks(q_lat, q_pe, kv, k_pe, idx, scale, config=config)
  return sparse_mla_tpu.sparse_mla(q_lat, q_pe, kv, k_pe, idx, scale, config=config or sparse_mla_tpu.DEFAULT_CONFIG)
