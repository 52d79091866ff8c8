"""DSA selection on a Hopper GPU: the Mosaic GPU indexer-logits kernel and the pruned exact top-k,
side by side with XLA (einsum logits, ``lax.top_k``), at the 671B shapes (64 heads x 128, k = 2048).

  PYTHONPATH=. python3 benchmarks/indexer_gpu.py --out $OUT/indexer.json

Prints one table (and writes JSON): correctness checks first, then logits TFLOP/s (causal FLOPs
only) for a chunk of queries at the end of an L-token context, top-k times, the whole selection of
one layer's 128K prefill, and decode steps against a 128K cache as a share of HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Table, measured_hbm_bandwidth, median_seconds
from dsv32_jax import indexer, quant
from pallas_kernels.indexer_logits_mgpu import IndexerLogitsConfig, index_logits_mgpu
from pallas_kernels.topk_gpu import TopkGpuConfig, topk_gpu

H, D, K = 64, 128, 2048
report = Table(58)

C = IndexerLogitsConfig
LOGITS_CONFIGS = {  # name: (queries per CTA) x (keys per tile), queries per wgmma, products in flight
    "q2/kv128": C(2, 128),
    "q4/kv128": C(4, 128),
    "q4/kv64/n128": C(4, 64, queries_per_wgmma=2),
    "q4/kv128/n128/serial": C(4, 128, queries_per_wgmma=2, overlap=False),
    "q8/kv128/n128/serial": C(8, 128, queries_per_wgmma=2, overlap=False),
    "q8/kv64/n256/serial": C(8, 64, queries_per_wgmma=4, overlap=False),
}


def inputs(key, b, s, t):
  k1, k2, k3 = jax.random.split(key, 3)
  q8, _ = quant.act_quant(jax.random.normal(k1, (b, s, H, D), jnp.float32))
  k8, ks = quant.act_quant(jax.random.normal(k2, (b, t, D), jnp.float32) * 3)
  w = jax.random.normal(k3, (b, s, H), jnp.float32) * 0.01
  return q8, w, k8, ks[..., 0]


def causal_flops(positions):
  return float(2 * H * D * np.sum(np.asarray(positions, np.int64) + 1))


def xla_logits(q8, w, k8, ks, positions):
  visible = jnp.arange(k8.shape[1])[None, None, :] <= positions[:, :, None]
  return indexer.index_logits(q8, w, k8, ks, visible)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out")
  ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072])
  ap.add_argument("--chunk", type=int, default=2048)
  ap.add_argument("--configs", nargs="*", default=list(LOGITS_CONFIGS), choices=list(LOGITS_CONFIGS),
                  help="logits kernel tilings to time side by side")
  ap.add_argument("--logits-only", action="store_true", help="only the checks and the logits kernel rows")
  args = ap.parse_args()
  dev = jax.devices()[0].device_kind
  print(f"device: {dev}, jax {jax.__version__}", flush=True)

  # HBM ceiling, measured: a device-to-device copy (bytes read + written).
  hbm = measured_hbm_bandwidth()
  report("HBM copy (read + write)", 0.0, TBps=hbm / 1e12)

  # Correctness on this GPU.
  key = jax.random.key(0)
  q8, w, k8, ks = inputs(key, 2, 256, 5000)
  pos = jnp.asarray(5000 - 256 + np.arange(256)[None] - np.array([[0], [1700]]), jnp.int32)
  ref = xla_logits(q8, w, k8, ks, pos)
  out = index_logits_mgpu(q8, w, k8, ks, pos)
  fin = jnp.isfinite(ref)
  err = float(jnp.linalg.norm(jnp.where(fin, out - ref, 0)) / jnp.linalg.norm(jnp.where(fin, ref, 0)))
  same_mask = bool(jnp.array_equal(jnp.isneginf(out), jnp.isneginf(ref)))
  report("check: kernel vs reference logits", 0.0, rel_err=err, same_mask=str(same_mask))
  rows = ref.reshape(-1, ref.shape[-1])
  a = np.sort(np.asarray(topk_gpu(rows, K, (pos + 1).reshape(-1))), -1)
  r = np.sort(np.asarray(indexer.select_topk(rows, K)), -1)
  report("check: top-k kernel == lax.top_k sets", 0.0, equal=str(bool((a == r).all())))
  configs = {name: LOGITS_CONFIGS[name] for name in args.configs}
  for name, cfg in configs.items():
    try:
      out = index_logits_mgpu(q8, w, k8, ks, pos, cfg)
      err = float(jnp.linalg.norm(jnp.where(fin, out - ref, 0)) / jnp.linalg.norm(jnp.where(fin, ref, 0)))
      same_mask = bool(jnp.array_equal(jnp.isneginf(out), jnp.isneginf(ref)))
      report(f"check: {name} vs reference logits", 0.0, rel_err=err, same_mask=str(same_mask))
    except Exception as e:  # report and go on: one failing tiling must not lose the run
      print(f"  check {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
  for L in args.contexts:
    s = args.chunk
    q8, w, k8, ks = inputs(jax.random.key(L), 1, s, L)
    pos = jnp.asarray(L - s + np.arange(s)[None], jnp.int32)
    flops = causal_flops(pos)
    for name, cfg in configs.items():
      try:
        f = jax.jit(lambda *a, cfg=cfg: index_logits_mgpu(*a, config=cfg))
        t = median_seconds(f, q8, w, k8, ks, pos)
      except Exception as e:  # report and go on: one failing tiling must not lose the run
        print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      report(f"logits kernel {name}, {s} queries at the end of {L}", t, TFLOPs=flops / t / 1e12)
    xq = 256  # XLA materialises [queries, heads, keys]: measure a smaller chunk
    xpos = pos[:, -xq:]
    t = median_seconds(jax.jit(xla_logits), q8[:, -xq:], w[:, -xq:], k8, ks, xpos, iters=3)
    report(f"XLA einsum logits, {xq} queries at the end of {L}", t, TFLOPs=causal_flops(xpos) / t / 1e12)
    if args.logits_only:
      continue
    logits = jnp.where(jnp.arange(L)[None] <= pos[0, :, None],
                       jax.random.normal(jax.random.key(1), (s, L), jnp.float32), -jnp.inf)
    t_lax = median_seconds(jax.jit(lambda x: jax.lax.top_k(x, K)[1]), logits, iters=3)
    report(f"lax.top_k k=2048, {s} rows x {L}", t_lax)
    for warps in (4, 8):
      cfg = TopkGpuConfig(num_warps=warps)
      t = median_seconds(jax.jit(lambda x, n, cfg=cfg: topk_gpu(x, K, n, cfg)), logits, pos[0] + 1, iters=5)
      report(f"top-k kernel ({warps} warps), {s} causal rows x {L}", t, speedup=t_lax / t)
    full = jax.random.normal(jax.random.key(2), (s, L), jnp.float32)
    t = median_seconds(jax.jit(lambda x: topk_gpu(x, K)), full, iters=5)
    report(f"top-k kernel, {s} full rows x {L}", t)

  if args.logits_only:
    return write(args.out, dev)
  # The whole selection of one layer of a 128K prefill: 64 chunks of 2048 queries.
  L, s = 131072, args.chunk
  q8, w, k8, ks = inputs(jax.random.key(7), 1, s, L)
  select = jax.jit(lambda q, w, k, ks, pos: topk_gpu(index_logits_mgpu(q, w, k, ks, pos)[0], K, pos[0] + 1))
  jax.block_until_ready(select(q8, w, k8, ks, jnp.zeros((1, s), jnp.int32)))
  t0 = time.perf_counter()
  for c in range(L // s):
    out = select(q8, w, k8, ks, jnp.asarray(c * s + np.arange(s)[None], jnp.int32))
  jax.block_until_ready(out)
  report("selection of a 128K prefill, one layer (logits + top-k)", time.perf_counter() - t0)

  # Decode: one query per sequence against a 128K cache.
  for b in (1, 32, 128):
    q8, w, k8, ks = inputs(jax.random.key(b), b, 1, L)
    pos = jnp.full((b, 1), L - 1, jnp.int32)
    t_logits = median_seconds(jax.jit(index_logits_mgpu), q8, w, k8, ks, pos)
    step = jax.jit(lambda q, w, k, ks, pos: topk_gpu(index_logits_mgpu(q, w, k, ks, pos)[:, 0], K, pos[:, 0] + 1))
    t = median_seconds(step, q8, w, k8, ks, pos)
    cache_bytes = b * L * (D + 4)
    report(f"decode logits, batch {b}, 128K cache", t_logits, HBM_share=cache_bytes / t_logits / hbm)
    report(f"decode logits + top-k, batch {b}, 128K cache", t, HBM_share=cache_bytes / t / hbm)
    split = TopkGpuConfig(row_parts=None)  # each row's top-k across several programs
    step = jax.jit(lambda q, w, k, ks, pos: topk_gpu(index_logits_mgpu(q, w, k, ks, pos)[:, 0], K, pos[:, 0] + 1,
                                                     split))
    t = median_seconds(step, q8, w, k8, ks, pos)
    report(f"decode logits + split-row top-k, batch {b}, 128K cache", t, HBM_share=cache_bytes / t / hbm)

  write(args.out, dev)


def write(path, dev):
  if path:
    with open(path, "w") as f:
      json.dump({"device": dev, "rows": report.rows}, f, indent=2)


if __name__ == "__main__":
  main()
