"""Ahead-of-time compilation of the sharded model on a simulated mesh: bytes per device, no weights.

  PYTHONPATH=. python -m sharding.aot --devices 64 --mesh 1,64,1 --batch 64 --cache-len 131072
  PYTHONPATH=. python -m sharding.aot --devices 8 --mesh 1,8,1 --preset v32-671b --phase decode

With --topology (e.g. v5p:4x4x4) it compiles for that TPU slice through libtpu, on a machine without
TPUs. Otherwise, on a CPU, the mesh is simulated with ``--xla_force_host_platform_device_count`` (set here before JAX
creates its backend). Parameters and the cache are ``jax.ShapeDtypeStruct``s with the rules'
shardings; the prefill (batch x prompt tokens from position 0 into a cache of --cache-len slots) and
the decode step (one token per sequence against the full cache) are lowered and compiled with
``jax.jit(..., in_shardings, out_shardings)``, and ``compiled.memory_analysis()`` gives one device's
argument, output and temporary bytes. Parameter and cache bytes per device are also counted from the
shardings, so the three parts (weights, cache, activations) can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--devices", type=int, default=64, help="simulated CPU devices (ignored off CPU)")
  ap.add_argument("--mesh", default="1,64,1", help="data,expert,tensor")
  ap.add_argument("--preset", default="v32-671b")
  ap.add_argument("--layers", type=int, help="override num_hidden_layers (default: the preset's)")
  ap.add_argument("--phase", choices=["prefill", "decode", "both"], default="both")
  ap.add_argument("--batch", type=int, default=64, help="sequences (global)")
  ap.add_argument("--prompt-len", type=int, default=4096, help="prefill tokens per sequence")
  ap.add_argument("--cache-len", type=int, default=131072, help="cache slots per sequence")
  ap.add_argument("--weights", choices=["fp8", "bf16"], default="fp8")
  ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  ap.add_argument("--fp8-cache", action="store_true", help="the MLA latent cached as e4m3 + scales (656 B a token)")
  ap.add_argument("--capacity-factor", type=float, default=2.0)
  ap.add_argument("--round-rows", type=int, default=65536, help="worst-case expert receive buffer (rows)")
  ap.add_argument("--exchange", choices=["auto", "ragged", "dense"], default="auto",
                  help="the expert exchange compiled (auto: dense on CPU, which has no ragged all-to-all)")
  ap.add_argument("--topology", help="compile for a TPU slice instead, e.g. v5p:4x4x4 (64 chips); needs libtpu "
                  "importable (no TPU needed)")
  ap.add_argument("--out", help="write the results as JSON")
  args = ap.parse_args(argv)

  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()

  import jax
  import jax.numpy as jnp

  from dsv32_jax.config import preset
  from dsv32_jax.options import RunOptions
  from sharding import serve
  from sharding.plan import ShardingPlan, abstract_cache, abstract_params, bytes_per_device
  from sharding.rules import make_mesh

  devices = None
  if args.topology:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(args.topology, "tpu").devices
    # Trace-time choices in the model read the default backend (CPU widens bf16 matmuls to float32);
    # compile what the target runs.
    jax.default_backend = lambda: "tpu"
  cfg = preset(args.preset)
  if args.layers is not None:
    cfg = cfg.replace(n_layers=args.layers, n_dense_layers=min(cfg.n_dense_layers, args.layers))
  shape = tuple(int(v) for v in args.mesh.split(","))
  plan = ShardingPlan(make_mesh(*shape, devices=devices), expert_exchange=args.exchange,
                      expert_capacity_factor=args.capacity_factor, expert_round_rows=args.round_rows)
  opts = RunOptions(dtype=args.dtype, fp8_latent_cache=args.fp8_cache)
  params = abstract_params(plan, cfg, fp8=args.weights == "fp8")
  cache = abstract_cache(plan, cfg, cfg.n_layers, args.batch, args.cache_len, opts.jnp_dtype, opts.indexer_quant,
                         opts.fp8_latent_cache)
  used = {k: v for k, v in params.items() if k != "mtp"}  # the MTP module is not part of prefill/decode
  gib = 2.0 ** 30
  result = {
      "preset": args.preset, "layers": cfg.n_layers, "mesh": dict(zip(("data", "expert", "tensor"), shape)),
      "devices": plan.mesh.size, "target": plan.mesh.devices.flat[0].device_kind, "weights": args.weights, "dtype": args.dtype,
      "batch": args.batch, "cache_len": args.cache_len, "exchange": plan.exchange,
      "params_total_gib": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)) / gib,
      "params_per_device_gib": bytes_per_device(params) / gib,
      "params_used_per_device_gib": bytes_per_device(used) / gib,
      "cache_per_device_gib": bytes_per_device(cache) / gib,
      "phases": {},
  }
  print(json.dumps({k: v for k, v in result.items() if k != "phases"}), flush=True)

  def report(name, step, *args_):
    t0 = time.perf_counter()
    lowered = step.lower(*args_)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    row = {"compile_s": time.perf_counter() - t0,
           "argument_gib": m.argument_size_in_bytes / gib, "output_gib": m.output_size_in_bytes / gib,
           "alias_gib": m.alias_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib,
           "peak_estimate_gib": (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                 + m.temp_size_in_bytes) / gib}
    result["phases"][name] = row
    print(name, json.dumps(row), flush=True)

  b = args.batch
  if args.phase in ("prefill", "both"):
    step = serve.prefill_step(plan, cfg, opts, params, cache, b, args.prompt_len, donate_cache=True)
    tokens = jax.ShapeDtypeStruct((b, args.prompt_len), jnp.int32, sharding=step.in_shardings[1])
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=step.in_shardings[2])
    report(f"prefill {b}x{args.prompt_len}", step, params, tokens, lengths, cache)
  if args.phase in ("decode", "both"):
    step = serve.decode_step(plan, cfg, opts, params, cache, b, donate_cache=True)
    vec = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=step.in_shardings[1])
    report(f"decode {b} x 1 token, cache {args.cache_len}", step, params, vec, vec, cache)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
