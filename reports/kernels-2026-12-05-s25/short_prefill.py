"""Where a 4K prefill's DSA attention spends its time beyond dense attention (671B shapes, one sequence).

Times, each alone: the indexer's logits (kernel) and top-k over 4096 causal queries; the boolean selection
mask's scatter; cuDNN's fused attention causal with no mask (the dense layer), causal with the top-k mask
(the DSA layer now), and split: the first index_topk queries causal with no mask, the rest with the mask.
"""
import jax
import jax.numpy as jnp

from benchmarks.timing import median_seconds
from dsv32_jax import attention, mla
from dsv32_jax.config import preset
from pallas_kernels import dispatch

cfg = preset("v32-671b")
s, h, k_top = 4096, cfg.n_heads, cfg.index_topk
key = jax.random.key(0)
r = lambda i, shape, dt=jnp.bfloat16: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32).astype(dt)
pos = jnp.arange(s, dtype=jnp.int32)[None]
iq = r(1, (1, s, cfg.index_n_heads, cfg.index_head_dim), jnp.float8_e4m3fn)
iw = r(2, (1, s, cfg.index_n_heads), jnp.float32)
ik = r(3, (1, s, cfg.index_head_dim), jnp.float8_e4m3fn)
iks = jnp.abs(r(4, (1, s), jnp.float32))


def select(iq, iw, ik, iks):
  logits = dispatch.index_logits(iq, iw, ik, iks, pos, skip_invisible=True)
  return dispatch.topk(logits[0], k_top, pos[0] + 1)[None]


def time(name, fn, *args):
  print(f"{name:60s} {median_seconds(jax.jit(fn), *args, iters=10) * 1e3:8.3f} ms", flush=True)


time("index logits (kernel)", lambda *a: dispatch.index_logits(*a, pos, skip_invisible=True), iq, iw, ik, iks)
time("index logits + top-k", select, iq, iw, ik, iks)
idx = jax.jit(select)(iq, iw, ik, iks)
time("selection mask (scatter) & causal", lambda idx: (jnp.arange(s)[None, None] <= pos[:, :, None])
     & attention.selection_mask(idx, s), idx)
q_nope, q_pe = r(5, (1, s, h, cfg.qk_nope_head_dim)), r(6, (1, s, h, cfg.qk_rope_head_dim))
k_nope, v, k_pe = r(7, (1, s, h, cfg.qk_nope_head_dim)), r(8, (1, s, h, cfg.v_head_dim)), r(9, (1, s, cfg.qk_rope_head_dim))
allowed = jax.jit(lambda idx: (jnp.arange(s)[None, None] <= pos[:, :, None]) & attention.selection_mask(idx, s))(idx)
att = lambda allowed, causal, *a: mla.fused_naive_attention(cfg, *a, allowed, is_causal=causal, implementation="cudnn")
args = (q_nope, q_pe, k_nope, v, k_pe)
time("cuDNN causal, no mask (dense)", lambda *a: att(None, True, *a), *args)
time("cuDNN causal + top-k mask (DSA now)", lambda al, *a: att(al, True, *a), allowed, *args)
time("cuDNN top-k mask, not causal", lambda al, *a: att(al, False, *a), allowed, *args)


def split(al, qn, qp, kn, v, kp):
  first = att(None, True, qn[:, :k_top], qp[:, :k_top], kn[:, :k_top], v[:, :k_top], kp[:, :k_top])
  rest = att(al[:, k_top:], False, qn[:, k_top:], qp[:, k_top:], kn, v, kp)
  return jnp.concatenate([first, rest], axis=1)


time("cuDNN split: first top-k queries causal, rest masked", split, allowed, *args)
time("DSA attention core now: mask + cuDNN causal+mask", lambda idx, *a: att(
    (jnp.arange(s)[None, None] <= pos[:, :, None]) & attention.selection_mask(idx, s), True, *a), idx, *args)
