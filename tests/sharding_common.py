"""Shared by the multi-device sharding checks (run in subprocesses with forced host devices).

The same teacher-forced run -- a right-padded prefill, then decode steps at each sequence's own
position -- is done unsharded on one device (the reference) and sharded on a mesh; the logits must agree.
"""

from __future__ import annotations

import jax
import numpy as np

from dsv32_jax import cache as cache_lib
from dsv32_jax import generate
from dsv32_jax.options import RunOptions

F32_FP8 = RunOptions(dtype="float32")                                          # release FP8 simulations, f32
EXACT_F32 = RunOptions(dtype="float32", indexer_quant=False, latent_quant=False)

BATCH, PROMPT, CACHE_LEN, STEPS = 4, 40, 64, 3  # 40 > index_topk = 16: the indexer selects


def inputs(cfg, seed: int):
  """Fresh random prompts (right-padded, different lengths) and the tokens fed at each decode step."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, PROMPT)).astype(np.int32)
  lengths = np.array([PROMPT, 33, PROMPT - 1, 21], np.int32)[:BATCH]
  feed = rng.integers(0, cfg.vocab_size, (STEPS, BATCH)).astype(np.int32)
  return tokens, lengths, feed


def reference_logits(cfg, params_np, opts: RunOptions, tokens, lengths, feed, device=None):
  """(prefill logits [B,V], decode logits [STEPS,B,V]) unsharded, on one device."""
  device = device or jax.local_devices()[0]
  params = jax.device_put(params_np, device)
  cache = jax.device_put(cache_lib.init_cache(cfg, cfg.n_layers, BATCH, CACHE_LEN, opts.jnp_dtype,
                                              opts.indexer_quant), device)
  prefill = jax.jit(lambda p, t, n, c: generate.prefill(p, cfg, opts, t, n, c))
  step = jax.jit(lambda p, t, pos, c: generate.decode_step(p, cfg, opts, t, pos, c))
  logits, cache = prefill(params, jax.device_put(tokens, device), jax.device_put(lengths, device), cache)
  out = []
  for i in range(STEPS):
    step_logits, cache = step(params, jax.device_put(feed[i], device), jax.device_put(lengths + i, device), cache)
    out.append(np.asarray(step_logits))
  return np.asarray(logits), np.stack(out)


def sharded_logits(plan, cfg, params_np, opts: RunOptions, tokens, lengths, feed):
  """The same run with parameters, cache and inputs placed on plan's mesh; results on the host."""
  from sharding import serve
  from sharding.plan import shard_params, sharded_cache

  params = shard_params(plan, cfg, params_np)
  cache = sharded_cache(plan, cfg, cfg.n_layers, BATCH, CACHE_LEN, opts.jnp_dtype, opts.indexer_quant)
  prefill = serve.prefill_step(plan, cfg, opts, params, cache, BATCH, PROMPT)
  step = serve.decode_step(plan, cfg, opts, params, cache, BATCH)
  logits, cache = prefill(params, serve.put(tokens, prefill.in_shardings[1]),
                          serve.put(lengths, prefill.in_shardings[2]), cache)
  out = []
  for i in range(STEPS):
    step_logits, cache = step(params, serve.put(feed[i], step.in_shardings[1]),
                              serve.put(lengths + i, step.in_shardings[2]), cache)
    out.append(serve.to_host(step_logits))
  return serve.to_host(logits), np.stack(out), params, cache, prefill


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))

