"""The block-scaled FP8 linears of one 671B attention layer on a Hopper GPU, by tiling of the FP8 GEMM.

  PYTHONPATH=. python3 benchmarks/fp8_linear_gpu.py --rows 4096 131072 --configs auto 64,128,2,4 128,256,2,4,16

For each projection of the attention (MLA's wq_a, wkv_a, wq_b, wo; the indexer's wq_b and wk) and each
row count, times ``dense_gemm_fp8`` -- act_quant plus the grouped FP8 GEMM with one group, as
``layers.linear`` runs it -- under each tiling (``block_m,block_n,consumers,steps[,group_m]``; ``auto``: the
kernel's own choice, ``dense_config``), and the reference's bf16 product of the dequantised operands.
Prints each row (time, TFLOP/s) and the sum over the projections, checks each tiling against the
reference once (relative norm error), and writes JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.timing import Table, median_seconds, rel_err
from dsv32_jax import layers, quant
from dsv32_jax.config import preset
from pallas_kernels.grouped_gemm_fp8_mgpu import GroupedGemmConfig, dense_gemm_fp8

CFG = preset("v32-671b")
report = Table(58)


def projections(cfg=CFG) -> list[tuple[str, int, int]]:
  """(name, out features, in features) of the FP8 linears of one attention layer."""
  h = cfg.n_heads
  return [
      ("wq_a", cfg.q_lora_rank, cfg.dim),
      ("wkv_a", cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.dim),
      ("wq_b", h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank),
      ("wo", cfg.dim, h * cfg.v_head_dim),
      ("indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
      ("indexer.wk", cfg.index_head_dim, cfg.dim),
  ]


def parse_config(text: str) -> GroupedGemmConfig | None:
  if text == "auto":
    return None
  bm, bn, consumers, steps, *group = (int(v) for v in text.split(","))
  return GroupedGemmConfig(block_m=bm, block_n=bn, consumers=consumers, max_concurrent_steps=steps,
                           group_m=group[0] if group else 0)


def fp8_linear(key, n, k):
  w = jax.random.normal(key, (n, k), jnp.bfloat16).astype(quant.FP8)
  scale = jnp.exp2(jax.random.randint(jax.random.fold_in(key, 1), (-(-n // 128), k // 128), -9, -6)).astype(jnp.float32)
  return {"weight": w, "scale": scale}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, nargs="+", default=[4096, 131072])
  ap.add_argument("--configs", nargs="+", default=["auto"],
                  help="tilings: block_m,block_n,consumers,steps[,group_m], or auto (the kernel's choice)")
  ap.add_argument("--only", nargs="*", help="projection names to time (default: all)")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--no-reference", action="store_true", help="skip the bf16 reference product")
  ap.add_argument("--out")
  args = ap.parse_args()
  key = jax.random.key(0)
  names = {name for name, _, _ in projections()}
  for name in args.only or ():
    if name not in names:
      raise SystemExit(f"--only {name}: not a projection, expected one of {sorted(names)}")
  shapes = [p for p in projections() if not args.only or p[0] in args.only]
  totals: dict[tuple[int, str], float] = {}
  print(f"device: {jax.devices()[0].device_kind}")
  for m in args.rows:
    for name, n, k in shapes:
      p = fp8_linear(jax.random.fold_in(key, n * k), n, k)
      x = jax.random.normal(jax.random.fold_in(key, m + n), (m, k), jnp.bfloat16)
      flops = 2 * m * n * k
      ref = jax.jit(lambda x, p: layers.linear(p, x))
      want = ref(x[:4096], p)
      runs = [(c, jax.jit(lambda x, p, c=c: dense_gemm_fp8(x, p["weight"], p["scale"], jnp.bfloat16,
                                                           **({"config": parse_config(c)} if c != "auto" else {}))))
              for c in args.configs]
      if not args.no_reference:
        runs.append(("bf16 reference", ref))
      for label, fn in runs:
        seconds = median_seconds(fn, x, p, iters=args.iters)
        err = rel_err(fn(x[:4096], p), want) if label != "bf16 reference" else 0.0
        report(f"{m} rows  {name} [{n} x {k}]  {label}", seconds, tflops=flops / seconds / 1e12, rel_err=err)
        totals[(m, label)] = totals.get((m, label), 0.0) + seconds
  for (m, label), seconds in totals.items():
    report(f"{m} rows  all projections  {label}", seconds)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "rows": report.rows}, f, indent=1)


if __name__ == "__main__":
  main()
