"""The masked-attention kernel (``pallas_kernels.masked_mha_mgpu``) against cuDNN on a 4K DSA prefill.

671B shapes (128 heads, q/k head dim 192, v 128), one 4096-token sequence, a random top-2048 selection
per query among its visible keys. Checks first (the kernel against the float32 reference on a smaller
shape, and against cuDNN's masked output at full size), then times, each alone:

- cuDNN causal without a mask (what the dense layer runs) and with the top-k mask (what DSA ran),
- the kernel causal without a mask over all 4096 queries (against cuDNN's dense),
- the kernel as DSA uses it: the first index_topk queries causal, the rest under the top-k bits
  (checked against cuDNN's masked output),
- building the mask words from the top-k indices,

for each tiling given. TFLOP/s count the causal (query, key) pairs: 2 x heads x (192 + 128) a pair.

  PYTHONPATH=. python3 benchmarks/masked_mha_gpu.py [--tilings 128,2 64,3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from pallas_kernels import masked_mha_mgpu as mm

S, H, DK, DV, TOPK = 4096, 128, 192, 128, 2048


def random_topk(key, s: int, t: int, k: int, q_offset: int = 0):
  """[1, s, k] indices: k random visible keys a query (all of them where fewer are visible; -1 pads)."""
  scores = jax.random.uniform(key, (s, t))
  visible = jnp.arange(t)[None, :] <= q_offset + jnp.arange(s)[:, None]
  vals, idx = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), k)
  return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)[None]


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cudnn(q, k, v, allowed, causal: bool, scale: float):
  v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - v.shape[-1])))
  mask = None if allowed is None else allowed[:, None]
  return jax.nn.dot_product_attention(q, k, v_pad, mask=mask, scale=scale, is_causal=causal,
                                      implementation="cudnn")[..., :v.shape[-1]]


def jax_flash_attention(q, k, v, time):
  """Times JAX's own Hopper flash attention (equal head dims: v zero-padded to 192), causal, for scale."""
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_fa
    fa_cfg = jax_fa.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, DK - DV)))
    time("jax attention_mgpu causal (v padded to 192)", lambda q, k, v: jax_fa.attention(q, k, v, fa_cfg), q, k, v_pad)
  except Exception as e:  # noqa: BLE001  (a comparison only: its causal mode refuses some CUDA versions)
    print("jax attention_mgpu:", type(e).__name__, str(e)[:200], flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tilings", nargs="*", default=["128,2", "64,3", "64,4"], help="block_kv,stages")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--jax-attention", action="store_true", help="also time JAX's attention_mgpu (causal, v padded)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  configs = [mm.MaskedMhaConfig(*map(int, t.split(","))) for t in args.tilings]
  print("device:", jax.devices()[0].device_kind, flush=True)
  scale = DK ** -0.5
  key = jax.random.key(0)
  def r(i, shape):
    return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32).astype(jnp.bfloat16)
  results = {"device": jax.devices()[0].device_kind, "checks": {}, "times_ms": {}}

  # Checks: the float32 reference on 8 heads, 1024 queries at offset 1024 over 2048 keys, top-512 bits.
  s, t, h, off = 1024, 2048, 8, 1024
  q, k, v = r(1, (1, s, h, DK)), r(2, (1, t, h, DK)), r(3, (1, t, h, DV))
  idx = random_topk(jax.random.fold_in(key, 4), s, t, 512, off)
  allowed = jax.vmap(jax.vmap(lambda i: jnp.zeros((t,), bool).at[i].set(True, mode="drop")))(
      jnp.where(idx < 0, t, idx))
  want = mm.reference(q, k, v, allowed, scale, causal=True, q_offset=off)
  for cfg in configs:
    got = mm.masked_mha_mgpu(q, k, v, mm.selection_words(idx, t, cfg.block_kv), scale, causal=True, q_offset=off,
                             config=cfg)
    results["checks"][f"reference masked {cfg.block_kv},{cfg.max_concurrent_steps}"] = e = rel(got, want)
    print(f"check vs float32 reference, tiling {cfg.block_kv},{cfg.max_concurrent_steps}: masked {e:.2e}",
          flush=True)

  # The 4K prefill.
  q, k, v = r(5, (1, S, H, DK)), r(6, (1, S, H, DK)), r(7, (1, S, H, DV))
  idx = random_topk(jax.random.fold_in(key, 8), S, S, TOPK)
  allowed = jax.jit(lambda i: jax.vmap(jax.vmap(lambda r: jnp.zeros((S,), bool).at[r].set(True, mode="drop")))(
      jnp.where(i < 0, S, i)))(idx)
  pairs_causal = S * (S + 1) // 2
  flops = lambda pairs: 2 * H * (DK + DV) * pairs  # noqa: E731

  def time(name, fn, *a, pairs=pairs_causal):
    ms = median_seconds(fn if hasattr(fn, "lower") else jax.jit(fn), *a, iters=args.iters) * 1e3
    results["times_ms"][name] = ms
    print(f"{name:70s} {ms:8.3f} ms  {flops(pairs) / ms / 1e9:6.1f} TFLOP/s (causal pairs)", flush=True)

  dense = jax.jit(lambda q, k, v: cudnn(q, k, v, None, True, scale))(q, k, v)
  dsa_cudnn = jax.jit(lambda q, k, v, al: cudnn(q, k, v, al, True, scale))(q, k, v, allowed)
  time("cuDNN causal, no mask (dense layer)", lambda q, k, v: cudnn(q, k, v, None, True, scale), q, k, v)
  time("cuDNN causal + top-k mask (DSA before)", lambda q, k, v, al: cudnn(q, k, v, al, True, scale), q, k, v, allowed)
  for cfg in configs:
    tag = f"{cfg.block_kv},{cfg.max_concurrent_steps}"

    @jax.jit
    def causal(q, k, v, cfg=cfg):
      return mm.masked_mha_mgpu(q, k, v, None, scale, causal=True, config=cfg)

    @jax.jit
    def dsa(q, k, v, words, cfg=cfg):
      first = mm.masked_mha_mgpu(q[:, :TOPK], k[:, :TOPK], v[:, :TOPK], None, scale, causal=True, config=cfg)
      rest = mm.masked_mha_mgpu(q[:, TOPK:], k, v, words, scale, causal=True, q_offset=TOPK, config=cfg)
      return jnp.concatenate([first, rest], axis=1)

    words = mm.selection_words(idx[:, TOPK:], S, cfg.block_kv)
    e_dense, e_dsa = rel(causal(q, k, v), dense), rel(dsa(q, k, v, words), dsa_cudnn)
    results["checks"][f"4K vs cuDNN {tag}"] = {"causal": e_dense, "dsa": e_dsa}
    print(f"tiling {tag}: against cuDNN at 4K: causal {e_dense:.2e}, top-k masked {e_dsa:.2e}", flush=True)
    time(f"kernel {tag}: causal, no mask", causal, q, k, v)
    time(f"kernel {tag}: DSA (first 2048 causal, rest top-k bits)", dsa, q, k, v, words)
  time("mask words from the top-k (2048 queries)", lambda i: mm.selection_words(i, S), idx[:, TOPK:], pairs=0)
  if args.jax_attention:
    jax_flash_attention(q, k, v, time)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
