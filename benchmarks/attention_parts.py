"""Where one layer's prefill attention spends its time: the parts of each form, timed one by one.

At the 671B shapes (random weights, FP8 with --fp8) and a fresh prefill of each length, with the
kernels the model would run ("auto"):

- projections: MLA queries and latent, the indexer's queries and keys (Hadamard + FP8), the output
  projection; then each form's own: the MHA form's per-head keys and values (wkv_b over every token),
  the latent form's query absorption and output expansion;
- selection: indexer logits + top-k over the model's blocks of queries;
- attention cores on those selections: cuDNN dense causal (what DSA is compared with), the official
  form through cuDNN with the top-k set as a mask (``attention.fused_naive_attention_blocks``), and the
  sparse MLA kernel over the gathered rows (``dispatch.sparse_mla`` in the model's query blocks).

  PYTHONPATH=. python3 benchmarks/attention_parts.py --prefill 4096 32768 --fp8 --out parts.json
  PYTHONPATH=. python3 benchmarks/attention_parts.py --preset tiny --prefill 64 --iters 1   # CPU check

The masked cuDNN core is skipped above --max-masked keys (its mask grows as the square of the length).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.layer_671b import random_layer
from benchmarks.timing import Table, median_seconds
from dsv32_jax import attention as attention_lib
from dsv32_jax import indexer, mla
from dsv32_jax.config import preset
from dsv32_jax.layers import linear
from dsv32_jax.options import RunOptions
from dsv32_jax.rope import rope_angles
from pallas_kernels import dispatch


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="v32-671b")
  ap.add_argument("--prefill", type=int, nargs="*", default=[4096, 32768])
  ap.add_argument("--fp8", action="store_true", help="FP8 e4m3 linear weights with block scales")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--max-masked", type=int, default=32768, help="longest prefill for the masked cuDNN core")
  ap.add_argument("--max-dense", type=int, default=65536,
                  help="longest prefill for the MHA-form parts (its per-head keys and values take 64 KiB a token)")
  ap.add_argument("--out")
  args = ap.parse_args(argv)

  cfg = preset(args.preset)
  opts = RunOptions()
  dtype = opts.jnp_dtype
  p = random_layer(cfg, jax.random.key(0), args.fp8)["attn"]
  fused = dispatch.fused_mha_implementation(dtype, cfg.qk_head_dim) or "xla"
  table = Table()
  print(f"device: {jax.devices()[0].device_kind}; preset {args.preset}; weights {'fp8' if args.fp8 else 'bf16'}; "
        f"fused MHA through {fused}", flush=True)

  def bench(what, fn, *a):
    table(what, median_seconds(jax.jit(fn), *a, iters=args.iters))

  for s in args.prefill:
    x = jax.random.normal(jax.random.key(s), (1, s, cfg.dim), jnp.float32).astype(dtype)
    cos, sin = rope_angles(cfg, jnp.arange(s)[None])
    positions = jnp.arange(s, dtype=jnp.int32)[None]

    def projections(p, x, linears=opts.linear_kernels):
      q_nope, q_pe, qr = mla.project_queries(p, cfg, x, cos, sin, linears)
      c, k_pe = mla.project_latent(p, cfg, x, cos, sin, opts.latent_quant, linears)
      index_k, index_k_scale = indexer.indexer_keys(p["indexer"], cfg, x, cos, sin, opts.indexer_quant, linears)
      index_q, index_w = indexer.indexer_queries(p["indexer"], cfg, x, qr, cos, sin, opts.indexer_quant, linears)
      out = linear(p["wo"], q_nope.reshape(1, s, -1)[..., :cfg.n_heads * cfg.v_head_dim],  # wo's shape, any input
                   impl=linears)
      return q_nope, q_pe, c, k_pe, index_q, index_w, index_k, index_k_scale, out

    bench(f"prefill {s}: projections (MLA, indexer, wo)", projections, p, x)
    bench(f"prefill {s}:   the same, FP8 linears as the reference's bf16 products",
          lambda p, x: projections(p, x, "reference"), p, x)
    bench(f"prefill {s}:   of which the indexer's (q, k, weights; Hadamard + FP8)",
          lambda p, x: (indexer.indexer_keys(p["indexer"], cfg, x, cos, sin, opts.indexer_quant, opts.linear_kernels),
                        indexer.indexer_queries(p["indexer"], cfg, x,
                                                mla.project_queries(p, cfg, x, cos, sin, opts.linear_kernels)[2],
                                                cos, sin, opts.indexer_quant, opts.linear_kernels)), p, x)
    bench(f"prefill {s}:   of which the queries' low-rank part (wq_a + q_norm, shared)",
          lambda p, x: mla.project_queries(p, cfg, x, cos, sin, opts.linear_kernels)[2], p, x)
    q_nope, q_pe, c, k_pe, index_q, index_w, index_k, index_k_scale, _ = jax.jit(projections)(p, x)
    block = opts.kernel_query_chunk if dispatch.index_logits_runs_kernel(index_q, index_k) else opts.query_chunk

    def select(index_q, index_w, index_k, index_k_scale):
      def one_block(q, w, pos):
        logits = dispatch.index_logits(q, w, index_k, index_k_scale, pos, skip_invisible=True)  # as the model
        return dispatch.topk(logits, cfg.index_topk, pos + 1)
      return attention_lib.map_query_blocks(one_block, block, index_q, index_w, positions)

    bench(f"prefill {s}: selection (logits + top-k, {block}-query blocks)", select, index_q, index_w, index_k,
          index_k_scale)
    idx = jax.jit(select)(index_q, index_w, index_k, index_k_scale)
    del index_q, index_w, index_k, index_k_scale

    if s <= args.max_dense:
      expand = jax.jit(lambda p, c: mla.expand_keys(p, cfg, c, opts.linear_kernels))
      bench(f"prefill {s}: MHA form: per-head keys and values", expand, p, c)
      k_nope, v = expand(p, c)
      bench(f"prefill {s}: core, dense causal ({fused})",
            lambda *a: mla.fused_naive_attention(cfg, *a, None, is_causal=True, implementation=fused),
            q_nope, q_pe, k_nope, v, k_pe)
      if s <= args.max_masked:
        bench(f"prefill {s}: core, official form with the top-k mask ({fused})",
              lambda *a: attention_lib.fused_naive_attention_blocks(cfg, fused, *a, positions, idx, fresh=True),
              q_nope, q_pe, k_nope, v, k_pe)
      del k_nope, v

    bench(f"prefill {s}: latent form: absorb queries + expand output",
          lambda p, q: mla.latent_output(p, cfg, mla.absorb_query(p, cfg, q)), p, q_nope)
    q_lat = jax.jit(lambda p, q: mla.absorb_query(p, cfg, q))(p, q_nope)
    del q_nope

    def sparse(q_lat, q_pe, c, k_pe, idx):
      return attention_lib.map_query_blocks(
          lambda q, r, i: dispatch.sparse_mla(q, r, c, k_pe, i, cfg.softmax_scale), block, q_lat, q_pe, idx)

    bench(f"prefill {s}: core, sparse MLA over the gathered rows", sparse, q_lat, q_pe, c, k_pe, idx)
    if args.out:  # after each length: a later one running out of memory keeps the earlier rows
      with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "preset": args.preset, "fp8": args.fp8,
                   "rows": table.rows}, f, indent=2)


if __name__ == "__main__":
  sys.exit(main())
