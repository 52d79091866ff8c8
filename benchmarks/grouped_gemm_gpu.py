"""The routed experts on a Hopper GPU: this project's grouped FP8 GEMM against ``jax.lax.ragged_dot`` and
JAX's Mosaic GPU ``ragged_dot_mgpu`` (bf16), at the 671B expert shapes (256 experts, 7168 <-> 2048).

  PYTHONPATH=. python3 benchmarks/grouped_gemm_gpu.py --out $OUT/grouped_gemm.json

Prints one table (and writes JSON): correctness on this GPU first, then for 1K, 8K, 32K and 128K
routed rows (tokens x 8 experts, random routing) the gate+up and the down projection of each
implementation -- time, useful TFLOP/s (routed rows only, padding not counted) and the weight bytes
streamed as a share of the measured HBM copy bandwidth -- and one whole MoE layer (gate, routing,
experts, shared expert) per token, FP8 kernel path against bf16 experts through ``ragged_dot_mgpu``.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Table, measured_hbm_bandwidth, median_seconds
from dsv32_jax import moe, quant
from dsv32_jax.config import preset
from pallas_kernels import dispatch
from pallas_kernels.grouped_gemm_fp8_mgpu import (DEFAULT_CONFIG, GroupedGemmConfig, grouped_gemm_fp8,
                                                  grouped_gemm_fp8_reference)

CFG = preset("v32-671b")
E, DIM, INTER, TOPK = CFG.n_routed_experts, CFG.dim, CFG.moe_inter_dim, CFG.n_activated_experts
report = Table(60)


def fp8_weights(key, e, n, k, chunk=32):
  """Random e4m3 [E, N, K] with power-of-two 128x128 block scales, made a few experts at a time."""
  parts, scales = [], []
  for i, sub in enumerate(jax.random.split(key, -(-e // chunk))):
    c = min(chunk, e - i * chunk)
    k1, k2 = jax.random.split(sub)
    parts.append(jax.random.normal(k1, (c, n, k), jnp.bfloat16).astype(quant.FP8))
    scales.append(jnp.exp2(jax.random.randint(k2, (c, n // 128, k // 128), -9, -6).astype(jnp.float32)))
  return jnp.concatenate(parts), jnp.concatenate(scales)


def bf16_weights(w, s, chunk=32):
  return jnp.concatenate([quant.dequant_weight(w[i:i + chunk], s[i:i + chunk], jnp.bfloat16)
                          for i in range(0, w.shape[0], chunk)])


def random_routing(key, tokens):
  return jnp.argsort(jax.random.uniform(key, (tokens, E)), axis=1)[:, :TOPK].astype(jnp.int32)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_small(key):
  """The kernel against its reference at small shapes with empty and uneven groups."""
  bm, e, n, k = DEFAULT_CONFIG.block_m, 6, 384, 512
  sizes = np.array([130, 0, 1, 64, 0, 77])
  block_expert = np.concatenate([np.full(-(-z // bm), i) for i, z in enumerate(sizes)] + [np.full(3, -1)])
  m = len(block_expert) * bm
  k1, k2, k3 = jax.random.split(key, 3)
  xq, xs = quant.act_quant(jax.random.normal(k1, (m, k), jnp.float32))
  ws = [fp8_weights(kk, e, n, k) for kk in (k2, k3)]
  args = (xq, xs, tuple(w for w, _ in ws), tuple(s for _, s in ws), jnp.asarray(block_expert, jnp.int32))
  used = int(np.sum(block_expert >= 0)) * bm
  got = jax.jit(grouped_gemm_fp8)(*args)[:, :used].astype(jnp.float32)
  ref = grouped_gemm_fp8_reference(*args)[:, :used].astype(jnp.float32)
  err = rel(got, ref)
  report("check: kernel vs reference, 6 experts (sizes 130,0,1,64,0,77)", 0.0, rel_err=err)
  assert err < 1e-2, err


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--routed-rows", type=int, nargs="*", default=[1024, 8192, 32768, 131072])
  ap.add_argument("--moe-tokens", type=int, nargs="*", default=[128, 4096, 16384])
  ap.add_argument("--xla-max-rows", type=int, default=1024, help="jax.lax.ragged_dot only up to this many rows")
  ap.add_argument("--steps", type=int, nargs="*", default=[DEFAULT_CONFIG.max_concurrent_steps],
                  help="K-pipeline depths of the kernel to time (a tuning sweep)")
  ap.add_argument("--consumers", type=int, nargs="*", default=[DEFAULT_CONFIG.consumers],
                  help="compute warpgroups of the kernel to time (1, 2)")
  ap.add_argument("--kernel-only", action="store_true", help="skip the ragged_dot baselines")
  args = ap.parse_args()
  dev = jax.devices()[0].device_kind
  print(f"device: {dev}, jax {jax.__version__}, kernel config {DEFAULT_CONFIG}", flush=True)
  hbm = measured_hbm_bandwidth()
  report("HBM copy (read + write)", 0.0, TBps=hbm / 1e12)
  key = jax.random.key(0)
  check_small(jax.random.fold_in(key, 1))

  w1, s1 = fp8_weights(jax.random.fold_in(key, 2), E, INTER, DIM)
  w3, s3 = fp8_weights(jax.random.fold_in(key, 3), E, INTER, DIM)
  w2, s2 = fp8_weights(jax.random.fold_in(key, 4), E, DIM, INTER)
  if not args.kernel_only or args.moe_tokens:  # the bf16 baselines' weights (22.5 GB)
    w1_bf16, w3_bf16, w2_bf16 = bf16_weights(w1, s1), bf16_weights(w3, s3), bf16_weights(w2, s2)
  scale_bytes = 4 * (s1.size + s3.size + s2.size) // E

  # Weights go in as arguments: a jitted closure over them would embed gigabytes of constants.
  gate_up = jax.jit(lambda q, s, be, w, c: grouped_gemm_fp8(q, s, w[:2], w[2:], be, c), static_argnums=4)
  down = jax.jit(lambda q, s, be, w, c: grouped_gemm_fp8(q, s, w[:1], w[1:], be, c), static_argnums=4)
  configs = [GroupedGemmConfig(max_concurrent_steps=steps, consumers=wgs) for wgs in args.consumers
             for steps in args.steps]
  mgpu = jax.jit(lambda x, g, *ws: tuple(dispatch._ragged_dot_mgpu(x, w, g) for w in ws))
  xla = jax.jit(lambda x, g, *ws: tuple(dispatch.grouped_matmul_reference(x, w, g) for w in ws))

  for rows in args.routed_rows:
    tokens = rows // TOPK
    idx = random_routing(jax.random.fold_in(key, rows), tokens)
    order = jnp.argsort(idx.reshape(-1), stable=True)
    sizes = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.int32)
    blocks = jax.jit(moe.align_to_blocks, static_argnums=(1, 2))(sizes, rows, DEFAULT_CONFIG.block_m)
    token = jnp.take(order, blocks.row_source, mode="fill", fill_value=rows) // TOPK
    x = jax.random.normal(jax.random.fold_in(key, 5), (tokens, DIM), jnp.bfloat16)
    xq, xs = quant.act_quant(x)
    rows_q = jnp.take(xq, token, axis=0, mode="fill", fill_value=0)
    rows_s = jnp.take(xs, token, axis=0, mode="fill", fill_value=0)
    h = jax.random.normal(jax.random.fold_in(key, 6), (rows_q.shape[0], INTER), jnp.bfloat16)
    hq, hs = quant.act_quant(h)
    experts_used = int(jnp.sum(jnp.bincount(idx.reshape(-1), length=E) > 0))
    padded_rows = int(jnp.sum(blocks.block_expert >= 0)) * DEFAULT_CONFIG.block_m
    flops_up, flops_down = 2.0 * rows * DIM * 2 * INTER, 2.0 * rows * INTER * DIM
    bytes_up = experts_used * (2 * INTER * DIM + scale_bytes * 2 / 3)
    bytes_down = experts_used * (DIM * INTER + scale_bytes / 3)
    tag = f"{rows // 1024}K rows ({experts_used} experts, {padded_rows} padded)"

    for c in configs:
      name = f"fp8 kernel{'' if len(configs) == 1 else f' ({c.consumers} WG, {c.max_concurrent_steps} steps)'}"
      t = median_seconds(gate_up, rows_q, rows_s, blocks.block_expert, (w1, w3, s1, s3), c)
      report(f"{name} gate+up, {tag}", t, TFLOPs=flops_up / t / 1e12, weight_HBM_share=bytes_up / t / hbm)
      t = median_seconds(down, hq, hs, blocks.block_expert, (w2, s2), c)
      report(f"{name} down, {tag}", t, TFLOPs=flops_down / t / 1e12, weight_HBM_share=bytes_down / t / hbm)
    if args.kernel_only:
      continue

    x_sorted = x[order // TOPK]
    h_sorted = h[:rows]
    t = median_seconds(mgpu, x_sorted, sizes, w1_bf16, w3_bf16)
    report(f"ragged_dot_mgpu bf16 gate+up, {rows // 1024}K rows", t, TFLOPs=flops_up / t / 1e12,
           weight_HBM_share=2 * bytes_up / t / hbm)
    t = median_seconds(mgpu, h_sorted, sizes, w2_bf16)
    report(f"ragged_dot_mgpu bf16 down, {rows // 1024}K rows", t, TFLOPs=flops_down / t / 1e12,
           weight_HBM_share=2 * bytes_down / t / hbm)
    if rows <= args.xla_max_rows:
      try:
        t = median_seconds(xla, x_sorted, sizes, w1_bf16, w3_bf16, iters=3)
        report(f"jax.lax.ragged_dot bf16 gate+up, {rows // 1024}K rows", t, TFLOPs=flops_up / t / 1e12)
      except Exception as err:  # noqa: BLE001  (XLA's dense expansion runs out of memory at large sizes)
        report(f"jax.lax.ragged_dot bf16 gate+up, {rows // 1024}K rows: {type(err).__name__}", float("nan"))
    del rows_q, rows_s, hq, hs, x_sorted, h_sorted

  # One whole MoE layer (gate, routing, experts, shared expert): FP8 kernel path vs bf16 experts.
  if not args.moe_tokens:
    return finish(args, dev, hbm)
  k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 7), 3)
  shared = {name: dict(zip(("weight", "scale"), fp8_weights(kk, 1, *shape)))
            for name, kk, shape in (("w1", k1, (INTER, DIM)), ("w3", k2, (INTER, DIM)), ("w2", k3, (DIM, INTER)))}
  shared = jax.tree.map(lambda a: a[0], shared)
  gate = {"weight": jax.random.normal(k1, (E, DIM), jnp.float32) * DIM ** -0.5,
          "bias": jax.random.normal(k2, (E,), jnp.float32) * 0.1}
  p_fp8 = {"gate": gate, "shared": shared,
           "experts": {"w1": {"weight": w1, "scale": s1}, "w3": {"weight": w3, "scale": s3},
                       "w2": {"weight": w2, "scale": s2}}}
  p_bf16 = {"gate": gate, "shared": shared,
            "experts": {"w1": {"weight": w1_bf16}, "w3": {"weight": w3_bf16},
                        "w2": {"weight": w2_bf16}}}
  layer = jax.jit(lambda p, x: moe.moe(p, CFG, x))
  for tokens in args.moe_tokens:
    x = jax.random.normal(jax.random.fold_in(key, tokens), (1, tokens, DIM), jnp.bfloat16)
    if tokens == args.moe_tokens[0]:
      # bf16 experts take unquantised activations: the two differ by the activations' e4m3 rounding (~3%).
      err = rel(layer(p_fp8, x).astype(jnp.float32), layer(p_bf16, x).astype(jnp.float32))
      report(f"check: MoE layer, fp8 kernel vs bf16 experts, {tokens} tokens", 0.0, rel_err=err)
      assert err < 6e-2, err
    for name, p in (("fp8 kernel", p_fp8), ("bf16 experts, ragged_dot_mgpu", p_bf16)):
      t = median_seconds(layer, p, x)
      report(f"MoE layer ({name}), {tokens} tokens", t, us_per_token=t / tokens * 1e6, tokens_per_s=tokens / t)

  finish(args, dev, hbm)


def finish(args, dev, hbm):
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": dev, "jax": jax.__version__, "hbm_Bps": hbm, "rows": report.rows}, f, indent=1)


if __name__ == "__main__":
  main()
