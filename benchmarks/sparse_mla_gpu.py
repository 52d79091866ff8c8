"""Sparse MLA on a GPU: the Pallas kernel (Triton lowering) against the plain-JAX gathered reference, at
the 671B shapes (128 heads, latent 512 + rope 64, top-2048), bf16.

  PYTHONPATH=. python3 benchmarks/sparse_mla_gpu.py --out $OUT/sparse_mla.json
  PYTHONPATH=. python3 benchmarks/sparse_mla_gpu.py --configs 64,64,8,2 64,32,4,3 --skip-reference   # a sweep
  PYTHONPATH=. python3 benchmarks/sparse_mla_gpu.py --contexts 131072 --decode-batch --rows same    # gathers from L2
  PYTHONPATH=. ncu --kernel-name regex:sparse_mla --launch-count 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 benchmarks/sparse_mla_gpu.py --contexts 131072 --decode-batch \
      --skip-reference                                                       # one launch under Nsight Compute

Prints one table (and writes JSON): a correctness check on this GPU, then prefill -- a chunk of
--chunk queries at the end of an L-token context (L = 4K, 32K, 128K), each with its own random
2048 of the visible keys -- in useful TFLOP/s (2 * heads * k * (2 * 512 + 64) a query), and decode
steps (one query per sequence, batch 1 / 32 / 128, 128K cache; from the bf16 cache and from the
656-byte FP8 one) with the gathered rows' bytes as a share of the measured HBM copy bandwidth.
``--configs``: block_h,block_k,num_warps,num_stages[,h] each; a config the GPU cannot run (e.g. more
shared memory than it has) is reported as FAILED and skipped.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.timing import Table, measured_hbm_bandwidth, median_seconds
from dsv32_jax import quant
from dsv32_jax.mla import sparse_attention_scaled
from pallas_kernels.sparse_mla_gpu import DEFAULT_CONFIG, FP8_CACHE_CONFIG, SparseMlaGpuConfig, flops, sparse_mla_gpu

H, C, R, K = 128, 512, 64, 2048
SCALE = 0.0625
report = Table(64)


ROW_PATTERNS = ("random", "window", "same")


def inputs(key, b, s, t, visible_from, rows="random"):
  """Random bf16 queries and cache; each query selects K keys below its position: K random ones, or (a
  probe of what the gathers cost) the K just below the chunk's start sliding with the query ("window":
  neighbours share nearly all rows) or the same K rows for every query ("same": they stay in L2)."""
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  q = jax.random.normal(k1, (b, s, H, C), jnp.bfloat16)
  qp = jax.random.normal(k2, (b, s, H, R), jnp.bfloat16)
  kv = jax.random.normal(k3, (b, t, C), jnp.bfloat16)
  kpe = jax.random.normal(k4, (b, t, R), jnp.bfloat16)
  query, slot = jnp.arange(s)[None, :, None], jnp.arange(K)[None, None, :]
  limit = visible_from + query + 1  # causal: query i of the chunk sees up to its position
  if rows == "random":
    idx = (jax.random.uniform(k5, (b, s, K)) * limit).astype(jnp.int32)
  elif rows == "window":
    idx = jnp.broadcast_to(jnp.maximum(limit - K + slot, -1), (b, s, K)).astype(jnp.int32)
  else:
    idx = jnp.broadcast_to(jnp.where(slot < limit, slot * (visible_from + 1) // K, -1), (b, s, K)).astype(jnp.int32)
  return q, qp, kv, kpe, idx


def parse_config(text: str) -> SparseMlaGpuConfig:
  """block_h,block_k,num_warps,num_stages[,h]: a trailing h launches a query's head blocks side by side."""
  values = text.split(",")
  bh, bk, warps, stages = (int(v) for v in values[:4])
  return SparseMlaGpuConfig(block_h=bh, block_k=bk, num_warps=warps, num_stages=stages,
                            heads_inner=values[4:] == ["h"])


def label(c: SparseMlaGpuConfig) -> str:
  return f"{c.block_h}/{c.block_k}/{c.num_warps}/{c.num_stages}{'/h' if c.heads_inner else ''}"


def time_or_none(name: str, fn, *operands):
  """Median seconds, or None (reported) where this config does not run on the device (e.g. shared memory)."""
  try:
    return median_seconds(fn, *operands)
  except jax.errors.JaxRuntimeError as e:
    print(f"{name}: FAILED: {str(e).splitlines()[0][:160]}", flush=True)
    return None


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072])
  ap.add_argument("--chunk", type=int, default=2048)
  ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32, 128])
  ap.add_argument("--decode-context", type=int, default=131072)
  ap.add_argument("--configs", nargs="*", default=None,
                  help="kernel configs bh,bk,warps,stages[,h] to time (default: the bf16- and FP8-cache defaults)")
  ap.add_argument("--rows", default="random", choices=ROW_PATTERNS,
                  help="which rows the prefill queries select (see inputs(); decode always random)")
  ap.add_argument("--skip-reference", action="store_true")
  ap.add_argument("--skip-fp8-cache", action="store_true", help="decode from the bf16 cache only")
  ap.add_argument("--interpret", action="store_true", help="the kernel in interpret mode (a CPU smoke run)")
  args = ap.parse_args()
  configs = [parse_config(c) for c in args.configs] if args.configs else [DEFAULT_CONFIG, FP8_CACHE_CONFIG]
  dev = jax.devices()[0].device_kind
  print(f"device: {dev}, jax {jax.__version__}", flush=True)
  hbm = measured_hbm_bandwidth(2**24 if args.interpret else 2**30)
  report("HBM copy (read + write)", 0.0, TBps=hbm / 1e12)

  kernels = {c: jax.jit(lambda *a, c=c: sparse_mla_gpu(*a, SCALE, c, interpret=args.interpret)[0]) for c in configs}
  ref = jax.jit(lambda *a: sparse_attention_scaled(SCALE, *a))
  key = jax.random.key(0)

  check = inputs(jax.random.fold_in(key, 1), 2, 4 if args.interpret else 64, 5000, 4000)
  want = sparse_attention_scaled(SCALE, *(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in check))
  for c, fn in list(kernels.items()):
    try:
      got = fn(*check).astype(jnp.float32)
    except jax.errors.JaxRuntimeError as e:  # e.g. more shared memory than the device has
      print(f"kernel {c}: FAILED: {str(e).splitlines()[0][:160]}", flush=True)
      del kernels[c]
      continue
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    report(f"check: kernel {label(c)} vs float32 reference", 0.0,
           rel_err=err)
    assert err < 2e-2, err

  def run(tag, operands, work, read_bytes):
    for c, fn in kernels.items():
      if (t := time_or_none(f"kernel {c}: {tag}", fn, *operands)) is None:
        continue
      report(f"kernel {label(c)}: {tag}", t, TFLOPs=work / t / 1e12,
             HBM_share=read_bytes / t / hbm)
    if not args.skip_reference:
      t = median_seconds(ref, *operands)
      report(f"reference (XLA gather + einsum): {tag}", t, TFLOPs=work / t / 1e12, HBM_share=read_bytes / t / hbm)

  for length in args.contexts:
    s = min(args.chunk, length)
    operands = inputs(jax.random.fold_in(key, length), 1, s, length, length - s, args.rows)
    row_bytes = 2 * (C + R)
    rows = "" if args.rows == "random" else f", {args.rows} rows"
    run(f"prefill, {s} queries at context {length:,}{rows}", operands, flops(1, s, H, C, R, K),
        s * K * row_bytes + 2 * s * H * (C + R + C))
    del operands

  for b in args.decode_batch:
    t_len = args.decode_context
    operands = inputs(jax.random.fold_in(key, b), b, 1, t_len, t_len - 1)
    run(f"decode, batch {b}, cache {t_len:,}", operands, flops(b, 1, H, C, R, K),
        b * K * 2 * (C + R) + 2 * b * H * (C + R + C))
    if not args.skip_fp8_cache:  # FlashMLA's 656-byte layout: e4m3 latent + 4 scales + bf16 rope
      q, qp, kv, kpe, idx = operands
      kv8, kv_scale = jax.jit(lambda kv: jax.lax.map(quant.act_quant, kv))(kv)  # a sequence at a time: the
      # whole batch-128 cache quantised at once needs 32 GiB of float32 temporaries
      for c in kernels:
        fn = jax.jit(lambda q, qp, kv8, kpe, idx, sc, c=c: sparse_mla_gpu(q, qp, kv8, kpe, idx, SCALE, c,
                                                                          interpret=args.interpret, kv_scale=sc)[0])
        if (t := time_or_none(f"kernel {c}: FP8 cache, batch {b}", fn, q, qp, kv8, kpe, idx, kv_scale)) is None:
          continue
        report(f"kernel {label(c)}: decode, batch {b}, FP8 cache", t,
               TFLOPs=flops(b, 1, H, C, R, K) / t / 1e12,
               HBM_share=(b * K * 656 + 2 * b * H * (C + R + C)) / t / hbm)
      if not args.skip_reference:  # gathers the e4m3 rows, dequantises only them
        ref8 = jax.jit(lambda q, qp, kv8, kpe, idx, sc: sparse_attention_scaled(SCALE, q, qp, kv8, kpe, idx, sc))
        if (t := time_or_none(f"reference: FP8 cache, batch {b}", ref8, q, qp, kv8, kpe, idx, kv_scale)) is not None:
          report(f"reference (XLA gather + einsum): decode, batch {b}, FP8 cache", t,
                 TFLOPs=flops(b, 1, H, C, R, K) / t / 1e12, HBM_share=(b * K * 656 + 2 * b * H * (C + R + C)) / t / hbm)
      del kv8, kv_scale
    del operands

  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": dev, "jax": jax.__version__, "hbm_Bps": hbm, "rows": report.rows}, f, indent=1)


if __name__ == "__main__":
  main()
