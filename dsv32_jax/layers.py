"""Building blocks shared by every part of the model: norms, the (FP8) linear, SwiGLU.

Precision follows the official code: norms compute in float32 and return the input dtype; a linear
whose weight is FP8 runs the official ``fp8_gemm`` (activations quantised per 1x128 block with
power-of-two scales, float32 accumulation, output in the activation dtype); a float weight runs a
plain matmul in the activation dtype with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from dsv32_jax import quant
from pallas_kernels import dispatch

Linear = dict  # {"weight": [..., out, in]} or {"weight": e4m3, "scale": f32 block scales}


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, "d"], eps: float) -> Float[Array, "... d"]:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def layer_norm(x: Float[Array, "... d"], weight: Float[Array, "d"], bias: Float[Array, "d"],
               eps: float) -> Float[Array, "... d"]:
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def matmul(eq: str, a: Array, b: Array, out_dtype=None) -> Array:
  """einsum with float32 accumulation, rounded to out_dtype (default: a's dtype).

  float32 operands run at full precision (no TF32). XLA's CPU backend has no bf16 x bf16 -> f32
  dot, so there bf16 operands are widened first: bf16 products are exact in float32, so the result
  is the same.
  """
  if jax.default_backend() == "cpu" and jnp.bfloat16 in (a.dtype, b.dtype):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
  out = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32, precision=precision)
  return out.astype(out_dtype or a.dtype)


def linear_operands(p: Linear, x: Float[Array, "... i"]) -> tuple[Float[Array, "... i"], Float[Array, "*b o i"]]:
  """The (activation, weight) pair a linear multiplies, both in x's dtype.

  For FP8 weights this is the official fp8_gemm written as exact arithmetic: act_quant values times
  their power-of-two scale are exact in bf16, and so are e4m3 weights times ue8m0 block scales, so a
  bf16 matmul with float32 accumulation of the dequantised operands equals the per-block fp8 GEMM up
  to the order of the float32 sums.
  """
  w = p["weight"]
  if "scale" in p:
    return quant.fake_quant(x), quant.dequant_weight(w, p["scale"], x.dtype)
  return x, w.astype(x.dtype)


def linear(p: Linear, x: Float[Array, "... i"], out_dtype=None, impl: str = "reference") -> Float[Array, "... o"]:
  """x @ W^T. impl (``pallas_kernels.dispatch``'s): a block-scaled FP8 weight on a GPU goes through the FP8
  GEMM kernel where ``dispatch.fp8_linear_backend`` says so (bf16 activations with "auto"; "pallas"
  forces it); otherwise the reference."""
  backend = dispatch.fp8_linear_backend(impl, "scale" in p and quant.is_fp8(p["weight"]), x.shape[-1], x.dtype)
  if backend is not None:
    from pallas_kernels.grouped_gemm_fp8_mgpu import dense_gemm_fp8
    return dense_gemm_fp8(x, p["weight"], p["scale"], out_dtype or x.dtype, interpret=backend == "interpret")
  xq, w = linear_operands(p, x)
  return matmul("...i,oi->...o", xq, w, out_dtype or x.dtype)


def swiglu(p: dict, x: Float[Array, "... d"], impl: str = "reference") -> Float[Array, "... d"]:
  """w2((silu(w1 x) * w3 x)), the product taken in float32 as the official MLP/Expert."""
  gate = linear(p["w1"], x, impl=impl).astype(jnp.float32)
  up = linear(p["w3"], x, impl=impl).astype(jnp.float32)
  return linear(p["w2"], (jax.nn.silu(gate) * up).astype(x.dtype), impl=impl)
