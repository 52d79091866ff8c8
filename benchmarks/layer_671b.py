"""One DeepSeek-V3.2 MoE layer at the 671B shapes (MLA + indexer + MoE with 256 experts), random weights.

Times prefill at several lengths and a decode step with the plain-JAX reference path (the baseline the
Pallas kernels must beat), and its parts: the indexer selection, the attention, the MoE. With
--dense-baseline, also the same layer's attention with every key attended by the fastest dense
attention JAX offers on the device (cuDNN's fused kernel through ``jax.nn.dot_product_attention`` on a
GPU, v padded to the qk head dim 192 as cuDNN needs equal dims; XLA elsewhere): the figure DSA must beat.

  PYTHONPATH=. python3 benchmarks/layer_671b.py --prefill 4096 32768 131072 --attention-only \
      --dense-baseline --prefill-form absorbed-gather --fp8 --decode-batch   # DSA vs dense attention

  PYTHONPATH=. python3 benchmarks/layer_671b.py --out results.json           # on a GPU
  PYTHONPATH=. python3 benchmarks/layer_671b.py --preset tiny --prefill 64    # a quick check on CPU

Weights are drawn on the device (never on the host); linears are bf16 unless --fp8 (then e4m3 with
block scales, dequantised by the reference path at each call).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import median_seconds
from dsv32_jax import attention as attention_lib
from dsv32_jax import cache as cache_lib
from dsv32_jax import mla, model, moe
from dsv32_jax.config import preset
from dsv32_jax.layers import linear, rms_norm
from dsv32_jax.options import RunOptions
from dsv32_jax.params import block_specs, is_spec, with_release_dtypes
from dsv32_jax.rope import rope_angles


def random_layer(cfg, key, fp8: bool):
  """One MoE block's parameters, drawn on the device; with fp8, the release's e4m3 + block-scale layout."""
  specs = with_release_dtypes(block_specs(cfg, moe=True)) if fp8 else block_specs(cfg, moe=True)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  unit = 2.0 ** -8  # a power-of-two block scale that keeps N(0, 1/in) weights inside e4m3's range

  @functools.partial(jax.jit, static_argnums=0)
  def draw(spec, k):
    if spec.init == "norm":
      return 1.0 + 0.1 * jax.random.normal(k, spec.shape, jnp.float32)
    if spec.init == "bias":
      return 0.1 * jax.random.normal(k, spec.shape, jnp.float32)
    if spec.init == "scale":
      return jnp.full(spec.shape, unit, jnp.float32)
    w = jax.random.normal(k, spec.shape, jnp.float32) * spec.shape[-1] ** -0.5
    if fp8 and spec.fp8_in_release:
      return (w / unit).astype(jnp.float8_e4m3fn)
    return w.astype(jnp.bfloat16)

  return jax.tree.unflatten(treedef, [draw(s, k) for s, k in zip(leaves, keys)])


def dense_attention(p: dict, cfg, opts: RunOptions, x, cos, sin):
  """The layer's attention (projections included) with every earlier key attended: MLA's MHA form through
  ``jax.nn.dot_product_attention`` (cuDNN on a GPU). A fresh causal prefill; the cache is not written."""
  b, s, _ = x.shape
  linears = opts.linear_kernels  # the same linears as the DSA layer
  q_nope, q_pe, _ = mla.project_queries(p, cfg, x, cos, sin, linears)
  c, k_pe = mla.project_latent(p, cfg, x, cos, sin, opts.latent_quant, linears)
  k_nope, v = mla.expand_keys(p, cfg, c, linears)
  on_gpu = jax.devices()[0].platform == "gpu"
  o = mla.fused_naive_attention(cfg, q_nope, q_pe, k_nope, v, k_pe, None, is_causal=True,
                                implementation="cudnn" if on_gpu else None)
  return linear(p["wo"], o.reshape(b, s, -1), impl=linears)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="v32-671b")
  ap.add_argument("--prefill", type=int, nargs="*", default=[4096, 16384])
  ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32])
  ap.add_argument("--decode-context", type=int, default=16384)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--fp8", action="store_true", help="FP8 e4m3 linear weights with block scales")
  ap.add_argument("--kernels", default="auto", choices=["auto", "reference", "pallas"])
  ap.add_argument("--reference-linears", action="store_true",
                  help="FP8 linears as the reference's bf16 product of dequantised operands, not the FP8 GEMM kernel")
  ap.add_argument("--prefill-form", default="auto", choices=["auto", "naive-mask", "absorbed-gather"],
                  help="the official MHA form with the top-k set as a score mask (cuDNN on a GPU), the latent "
                       "(MQA) form over the gathered top-k rows, or the model's default choice by length (auto: "
                       "RunOptions.gathered_prefill_from)")
  ap.add_argument("--query-chunk", type=int, help="RunOptions.query_chunk: queries per block in prefill")
  ap.add_argument("--kernel-query-chunk", type=int,
                  help="RunOptions.kernel_query_chunk: queries per block when the DSA kernels score and attend "
                       "(the block is the larger of the two chunks)")
  ap.add_argument("--skip-parts", action="store_true", help="time only whole layers")
  ap.add_argument("--attention-only", action="store_true", help="time only the attention part of prefill")
  ap.add_argument("--dense-baseline", action="store_true",
                  help="also time the attention with every key attended (cuDNN on a GPU) and the ratio")
  ap.add_argument("--out")
  args = ap.parse_args(argv)

  cfg = preset(args.preset)
  opts = RunOptions(kernels=args.kernels, fp8_linear_kernel=not args.reference_linears)
  if args.prefill_form == "absorbed-gather":
    opts = opts.replace(prefill_attention="absorbed", prefill_selection="gather")
  elif args.prefill_form == "naive-mask":
    opts = opts.replace(gathered_prefill_from=None)
  if args.query_chunk:
    opts = opts.replace(query_chunk=args.query_chunk)
  if args.kernel_query_chunk:
    opts = opts.replace(kernel_query_chunk=args.kernel_query_chunk)
  dtype = opts.jnp_dtype
  p = random_layer(cfg, jax.random.key(0), args.fp8)
  print(f"device: {jax.devices()[0].device_kind}; preset {args.preset}; weights {'fp8' if args.fp8 else 'bf16'}; "
        f"kernels {args.kernels}; prefill {args.prefill_form}; query chunks {opts.query_chunk} (reference) / "
        f"{max(opts.query_chunk, opts.kernel_query_chunk)} (DSA kernels)", flush=True)
  results = {"device": jax.devices()[0].device_kind, "preset": args.preset, "fp8": args.fp8,
             "prefill_form": args.prefill_form, "kernels": args.kernels, "rows": []}

  def record(name, seconds, tokens, compile_s):
    row = {"what": name, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "compile_s": compile_s}
    results["rows"].append(row)
    print(f"{name:44s} {seconds * 1e3:10.2f} ms  {tokens / seconds:12.1f} tokens/s  (compile {compile_s:.1f} s)",
          flush=True)

  def bench(name, fn, args_, tokens):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args_).compile()
    compile_s = time.perf_counter() - t0
    record(name, median_seconds(compiled, *args_, iters=args.iters), tokens, compile_s)

  for s in args.prefill:
    key = jax.random.key(s)
    x = jax.random.normal(key, (1, s, cfg.dim), jnp.float32).astype(dtype)
    cache = cache_lib.init_cache(cfg, 1, 1, s, dtype, opts.indexer_quant)
    start = jnp.zeros(1, jnp.int32)
    cos, sin = rope_angles(cfg, jnp.arange(s)[None])

    def layer(p, x, cache):
      h, cache, _ = model.block(p, cfg, opts, x, cache, jnp.int32(0), start, s, cos, sin, True)
      return h, cache

    def attn_only(p, x, cache):
      out, cache, _ = attention_lib.attention(p["attn"], cfg, opts, x, cache, jnp.int32(0), start, s, cos, sin)
      return out

    def moe_only(p, x):
      return moe.moe(p["ffn"], cfg, rms_norm(x, p["ffn_norm"], cfg.norm_eps), impl=opts.kernels,
                     linear_impl=opts.linear_kernels)

    if not args.attention_only:
      bench(f"prefill {s}: whole layer", layer, (p, x, cache), s)
    if not args.skip_parts or args.attention_only or args.dense_baseline:
      bench(f"prefill {s}: attention (indexer + top-k + MLA)", attn_only, (p, x, cache), s)
    if args.dense_baseline:
      bench(f"prefill {s}: dense attention (every key)",
            lambda p, x: dense_attention(p["attn"], cfg, opts, x, cos, sin), (p, x), s)
      sparse_ms, dense_ms = results["rows"][-2]["ms"], results["rows"][-1]["ms"]
      results.setdefault("dense_over_sparse", {})[s] = dense_ms / sparse_ms
      print(f"prefill {s}: dense / DSA attention time = {dense_ms / sparse_ms:.2f}", flush=True)
    if not args.skip_parts and not args.attention_only:
      bench(f"prefill {s}: MoE (gate + {cfg.n_routed_experts} experts + shared)", moe_only, (p, x), s)

  t = args.decode_context
  for b in args.decode_batch:
    key = jax.random.key(b)
    cache = cache_lib.init_cache(cfg, 1, b, t, dtype, opts.indexer_quant)
    cache = jax.tree.map(lambda a: jax.random.normal(key, a.shape, jnp.float32).astype(a.dtype), cache)
    x = jax.random.normal(key, (b, 1, cfg.dim), jnp.float32).astype(dtype)
    pos = jnp.full((b,), t - 1, jnp.int32)
    cos, sin = rope_angles(cfg, pos[:, None])

    def decode(p, x, cache):
      h, cache, _ = model.block(p, cfg, opts, x, cache, jnp.int32(0), pos, t, cos, sin, True)
      return h, cache

    bench(f"decode batch {b}, context {t}: whole layer", decode, (p, x, cache), b)

  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  sys.exit(main())
