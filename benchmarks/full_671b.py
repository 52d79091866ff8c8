"""The whole DeepSeek-V3.2 (671B: 61 layers + the MTP layer, 256 experts, FP8 weights with their 128x128
block scales, random values) on one multi-GPU host: prefill and decode throughput with DSA against the
same model with dense attention, and memory per GPU.

The weights are drawn on the devices straight into their sharded layout (one layer of a stacked leaf
at a time, so no device or host ever holds a whole leaf in float32); experts are split over the mesh's
``expert`` axis (expert parallelism, ``sharding.expert_parallel``), attention is data-parallel over
the batch and tensor-parallel over heads along ``tensor``. Workloads:

  prefill   one sequence of L tokens (--prefill, default 8K / 32K / 128K): tokens/s
  decode    a batch of B sequences (--decode-batch, default 1 / 32 / 128) at a --decode-context
            position (default 32K) of a cache of that length: median step time, tokens/s. The step
            reads the whole cache whatever it holds, so the cache is not filled by a prefill first.

each for DSA (the release: top-2048 keys per query; prefill in the latent form over the gathered rows)
and dense attention (the same weights with ``index_topk`` beyond the context: no indexer, every key;
prefill in the official MHA form). A point that does not fit in memory is reported as OOM.
The MTP layer's weights are loaded (they count in the memory) but neither workload runs it.

  PYTHONPATH=. python3 benchmarks/full_671b.py --out $OUT/full_671b.json       # nvidia-h200-x8
  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python3 benchmarks/full_671b.py \\
      --preset tiny --prefill 256 512 --decode-batch 1 8 --decode-context 256 --iters 1  # a CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks.ep_layers import draw_params
from dsv32_jax.config import preset
from dsv32_jax.options import RunOptions
from sharding import serve
from sharding.plan import ShardingPlan, abstract_params, bytes_per_device, sharded_cache
from sharding.rules import make_mesh

SCORE_BYTES = 1 << 32  # the dense MHA prefill scores [heads, query block, keys] in float32: at most 4 GiB


def peak_gib(devices) -> float | None:
  stats = [d.memory_stats() for d in devices]
  if not all(stats):
    return None  # the CPU keeps no statistics
  return max(s.get("peak_bytes_in_use", 0) for s in stats) / 2 ** 30


def attention_options(cfg, attention: str, length: int, kernels: str, fp8_cache: bool) -> tuple:
  """(config, RunOptions) of one attention mode over a cache of `length` slots."""
  if attention == "dsa":
    return cfg, RunOptions(prefill_attention="absorbed", prefill_selection="gather", kernels=kernels,
                           fp8_latent_cache=fp8_cache)
  block = max(16, min(256, SCORE_BYTES // (cfg.n_heads * length * 4)))
  return (cfg.replace(index_topk=max(cfg.index_topk, length)),
          RunOptions(query_chunk=block, kernels=kernels, fp8_latent_cache=fp8_cache))


def timed(fn, args_fn, iters: int):
  """(first call seconds, median of the next iters): each call gets fresh arguments from args_fn (the
  cache is donated)."""
  t0 = time.perf_counter()
  out = fn(*args_fn(None))
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    a = args_fn(out)
    t0 = time.perf_counter()
    out = fn(*a)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return first, (statistics.median(times) if times else first)


def is_oom(err: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def run_point(results, what, fn):
  try:
    row = {"what": what, **fn()}
  except Exception as err:  # noqa: BLE001
    if not is_oom(err):
      raise
    row = {"what": what, "oom": True, "error": str(err).splitlines()[0][:300]}
  results["rows"].append(row)
  extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "what")
  print(f"{what:42s} {extra}", flush=True)
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="v32-671b")
  ap.add_argument("--mesh", default=None, help="data,expert,tensor sizes (default: 1,<all devices>,1)")
  ap.add_argument("--prefill", type=int, nargs="*", default=[8192, 32768, 131072])
  ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32, 128])
  ap.add_argument("--decode-context", type=int, default=32768)
  ap.add_argument("--decode-steps", type=int, default=4, help="timed decode steps after a compiling one")
  ap.add_argument("--iters", type=int, default=2,
                  help="timed prefill calls after a compiling one (0: report the compiling call, compile included)")
  ap.add_argument("--attention", nargs="*", default=["dsa", "dense"], choices=["dsa", "dense"])
  ap.add_argument("--kernels", default="auto", choices=["auto", "reference", "pallas"])
  ap.add_argument("--fp8-cache", action="store_true",
                  help="the MLA latent cached as e4m3 + scales (656 B a token): 57%% of the bf16 cache's bytes")
  ap.add_argument("--out")
  args = ap.parse_args(argv)

  devices = jax.devices()
  mesh_shape = tuple(int(v) for v in args.mesh.split(",")) if args.mesh else (1, len(devices), 1)
  plan = ShardingPlan(make_mesh(*mesh_shape))
  cfg = preset(args.preset)
  print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}; mesh (data, expert, tensor) = "
        f"{mesh_shape}; {args.preset}: {cfg.n_layers} layers + {cfg.n_mtp_layers} MTP, {cfg.n_routed_experts} "
        f"experts; FP8 weights; kernels {args.kernels}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
  results = {"device": devices[0].device_kind, "devices": len(devices), "mesh": mesh_shape, "preset": args.preset,
             "fp8_latent_cache": args.fp8_cache,
             "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "kernels": args.kernels, "rows": []}

  t0 = time.perf_counter()
  params = draw_params(cfg, jax.random.key(0), True, abstract_params(plan, cfg, fp8=True))
  jax.block_until_ready(params)
  results["params_gib_per_device"] = bytes_per_device(params) / 2 ** 30
  print(f"weights drawn in {time.perf_counter() - t0:.0f} s: {results['params_gib_per_device']:.1f} GiB a device; "
        f"peak so far {peak_gib(devices)} GiB", flush=True)
  rng = np.random.default_rng(0)

  for attention in args.attention:
    for length in args.prefill:
      cache_len = -(-length // 256) * 256
      run_cfg, opts = attention_options(cfg, attention, cache_len, args.kernels, args.fp8_cache)

      def prefill_point():
        cache = sharded_cache(plan, run_cfg, run_cfg.n_layers, 1, cache_len, opts.jnp_dtype, opts.indexer_quant,
                              opts.fp8_latent_cache)
        step = serve.prefill_step(plan, run_cfg, opts, params, cache, 1, length)
        tokens = serve.put(rng.integers(0, cfg.vocab_size, (1, length)).astype(np.int32), step.in_shardings[1])
        lengths = serve.put(np.array([length], np.int32), step.in_shardings[2])
        state = {"cache": cache}

        def args_fn(out):
          if out is not None:
            state["cache"] = out[1]
          return params, tokens, lengths, state["cache"]
        first, seconds = timed(step, args_fn, args.iters)
        return {"seconds": seconds, "tokens_per_s": length / seconds, "first_call_s": first,
                "includes_compile": args.iters == 0,
                "cache_gib_per_device": bytes_per_device(state["cache"]) / 2 ** 30, "peak_gib": peak_gib(devices)}
      run_point(results, f"{attention} prefill {length}", prefill_point)

    for batch in args.decode_batch:
      ctx = args.decode_context
      cache_len = -(-(ctx + args.decode_steps + 1) // 256) * 256
      run_cfg, opts = attention_options(cfg, attention, cache_len, args.kernels, args.fp8_cache)

      def decode_point():
        cache = sharded_cache(plan, run_cfg, run_cfg.n_layers, batch, cache_len, opts.jnp_dtype,
                              opts.indexer_quant, opts.fp8_latent_cache)
        step = serve.decode_step(plan, run_cfg, opts, params, cache, batch)
        feed = rng.integers(0, cfg.vocab_size, (batch,)).astype(np.int32)
        state = {"cache": cache, "pos": ctx}

        def args_fn(out):
          if out is not None:
            state["cache"], state["pos"] = out[1], state["pos"] + 1
          return (params, serve.put(feed, step.in_shardings[1]),
                  serve.put(np.full((batch,), state["pos"], np.int32), step.in_shardings[2]), state["cache"])
        first, seconds = timed(step, args_fn, args.decode_steps)
        return {"step_s": seconds, "tokens_per_s": batch / seconds, "first_call_s": first,
                "cache_gib_per_device": bytes_per_device(state["cache"]) / 2 ** 30, "peak_gib": peak_gib(devices)}
      run_point(results, f"{attention} decode batch {batch} at {ctx}", decode_point)

  # DeepSeek's published cost ratios at 128K: prefill ~3.5x, decode ~3x cheaper with DSA than dense.
  by_name = {r["what"]: r for r in results["rows"] if not r.get("oom")}
  ratios = {}
  for name, row in by_name.items():
    if name.startswith("dsa ") and name.replace("dsa ", "dense ", 1) in by_name:
      ratios[name[4:]] = row["tokens_per_s"] / by_name[name.replace("dsa ", "dense ", 1)]["tokens_per_s"]
  results["dsa_over_dense_throughput"] = ratios
  for name, ratio in ratios.items():
    print(f"DSA / dense throughput, {name}: {ratio:.2f}x", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
