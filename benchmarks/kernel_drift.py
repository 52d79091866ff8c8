"""Where the GPU kernels move the tiny model's outputs away from the float32 reference, and by how much.

  PYTHONPATH=. python3 benchmarks/kernel_drift.py

The release's FP8 arithmetic is a chain of steps: every FP8 linear re-quantises its input to e4m3
(steps of 6-12%) and the indexer keeps a top-k set, so any difference in accumulation order -- FP8
tensor cores accumulate in fewer bits than float32 -- flips some roundings and selections and grows
from layer to layer. This prints, for the tiny preset (index_topk 32 over 160 keys) with bf16 and with
FP8 (release-format) weights, the per-layer share of top-k sets equal to the float32 reference's and
the logits' relative error for: all kernels; the DSA kernels only (experts on the reference path); the
grouped FP8 GEMM only; and the reference itself in bfloat16 (the default run mode) as the yardstick.
Then the grouped GEMM alone (no re-quantisation) and one MoE layer, kernel vs reference, same inputs.
On a CPU the GPU kernels run interpreted (slow, and exact: the drift is a property of the hardware).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import rel_err
from dsv32_jax import cache as cache_lib
from dsv32_jax import model, moe, quant
from dsv32_jax.config import preset
from dsv32_jax.options import RunOptions
from dsv32_jax.params import init_params
from pallas_kernels import dispatch
from pallas_kernels.grouped_gemm_fp8_mgpu import GroupedGemmConfig, grouped_gemm_fp8, grouped_gemm_fp8_reference

CFG = preset("tiny").replace(index_n_heads=16, index_topk=32)
BM = GroupedGemmConfig().block_m


def run_model(params, tokens, kernels: str, experts: str, dtype: str = "float32"):
  """(prefill logits, decode logits, top-k [layers, b, s, k]); experts: "auto", "kernel" or "reference"."""
  choose = dispatch.fp8_experts_backend

  def experts_backend(impl, fp8, dims):
    if experts == "kernel":
      return ("gpu" if dispatch.on_gpu() else "interpret") if fp8 else None
    return None if experts == "reference" else choose(impl, fp8, dims)

  dispatch.fp8_experts_backend = experts_backend
  try:
    b, opts = tokens.shape[0], RunOptions(dtype=dtype, kernels=kernels)
    cache = cache_lib.init_cache(CFG, CFG.n_layers, b, 192, opts.jnp_dtype)
    hidden, cache, topk = jax.jit(lambda p, t, c: model.forward(p, CFG, opts, t, jnp.zeros(b, jnp.int32), c,
                                                                kv_len=160, return_topk=True))(params, tokens[:, :160], cache)
    h2, _ = jax.jit(lambda p, t, c: model.forward(p, CFG, opts, t, jnp.full((b,), 160, jnp.int32), c))(
        params, tokens[:, 160:], cache)
    return np.asarray(model.logits(params, hidden)), np.asarray(model.logits(params, h2)), np.asarray(topk)
  finally:
    dispatch.fp8_experts_backend = choose


def agreement(topk, exact) -> list[float]:
  k = CFG.index_topk
  return [float(np.mean([set(a) == set(b) for a, b in zip(g.reshape(-1, k), w.reshape(-1, k))]))
          for g, w in zip(topk, exact)]


def main():
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 161)), jnp.int32)
  for fp8 in (False, True):
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, fp8=fp8))
    exact = run_model(params, tokens, "reference", "reference")
    print(f"-- {'FP8' if fp8 else 'bf16'} weights, against the float32 reference path", flush=True)
    for name, args in [("all kernels", ("auto", "auto")), ("DSA kernels, experts reference", ("auto", "reference")),
                       ("DSA reference, experts kernel", ("reference", "kernel")),
                       ("reference in bfloat16", ("reference", "reference", "bfloat16"))]:
      out = run_model(params, tokens, *args)
      print(f"{name:32s} top-k sets equal per layer {' '.join(f'{a:.3f}' for a in agreement(out[2], exact[2]))}"
            f"  logits prefill {rel_err(out[0], exact[0]):.2e} decode {rel_err(out[1], exact[1]):.2e}", flush=True)

  interpret = not dispatch.on_gpu()
  p = jax.tree.map(lambda a: jnp.asarray(a)[0], init_params(CFG, seed=5, fp8=True)["moe_layers"])["ffn"]
  x = jnp.asarray(rng.standard_normal((4, 160, CFG.dim)), jnp.float32)
  if not interpret:
    print(f"one MoE layer, float32, kernel vs reference: {rel_err(moe.moe(p, CFG, x), moe.moe(p, CFG, x, impl='reference')):.2e}")
  for n, k in ((CFG.moe_inter_dim, CFG.dim),) + (() if interpret else ((2048, 7168),)):  # 671B: GPU only
    sizes = [300, 0, 17, 1, 190, 64]
    block_expert = np.concatenate([np.full(-(-z // BM), e) for e, z in enumerate(sizes)]).astype(np.int32)
    m = len(block_expert) * BM
    xq, xs = quant.act_quant(jnp.asarray(rng.standard_normal((m, k)), jnp.float32))
    w = [quant.quantize_weight_np(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5) for _ in sizes]
    args = (xq, xs, (jnp.asarray(np.stack([a for a, _ in w])),), (jnp.asarray(np.stack([s for _, s in w])),),
            jnp.asarray(block_expert))
    got = grouped_gemm_fp8(*args, out_dtype=jnp.float32, interpret=interpret)
    print(f"grouped FP8 GEMM {n} x {k}, float32 out, kernel vs reference: "
          f"{rel_err(got, grouped_gemm_fp8_reference(*args, out_dtype=jnp.float32)):.2e}", flush=True)


if __name__ == "__main__":
  main()
