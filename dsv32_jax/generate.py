"""Batched generation: one prefill, then a jitted decode step with static shapes.

Prompts of different lengths are right-padded: every sequence keeps its true positions, the padding
writes cache slots past the prompt that no real query can see (keys beyond a query's position are
masked), and each decode step writes sequence b's token at its own slot ``length[b] + i``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv32_jax import cache as cache_lib
from dsv32_jax import model
from dsv32_jax.config import ModelConfig
from dsv32_jax.options import RunOptions
from dsv32_jax.params import Params
from dsv32_jax.sampling import SamplingParams, sample

CACHE_ALIGN = 256  # cache lengths are rounded up to this (whole top-k kernel blocks), and
PROMPT_ALIGN = 64  # padded prompt lengths too, so that nearby requests share compiled code


class GenerationError(ValueError):
  """A request that cannot be served: empty or too-long prompts, token ids outside the vocabulary."""


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]          # generated tokens per sequence (up to and including EOS)
  prompt_tokens: int               # real (unpadded) prompt tokens in the batch
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  compile_seconds: float

  @property
  def prefill_tokens_per_second(self) -> float:
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

  @property
  def decode_tokens_per_second(self) -> float:
    return len(self.tokens) * self.decode_steps / max(self.decode_seconds, 1e-9)


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int) -> None:
  if not prompts:
    raise GenerationError("no prompts given")
  if max_new_tokens < 1:
    raise GenerationError(f"max_new_tokens = {max_new_tokens} must be at least 1")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise GenerationError(f"prompt {i} is empty")
    bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise GenerationError(f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    if len(p) + max_new_tokens > max_len:
      raise GenerationError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new tokens exceed the cache of "
                            f"{max_len} positions")
  if max_len > cfg.max_seq_len:
    raise GenerationError(f"a cache of {max_len} positions exceeds the model's max_position_embeddings "
                          f"({cfg.max_seq_len})")


def prefill(params: Params, cfg: ModelConfig, opts: RunOptions, tokens: Int[Array, "b s"], lengths: Int[Array, "b"],
            cache: cache_lib.LayerCache) -> tuple[Float[Array, "b v"], cache_lib.LayerCache]:
  """Runs right-padded prompts from position 0; returns the logits at each prompt's last token."""
  b, s = tokens.shape
  hidden, cache = model.forward(params, cfg, opts, tokens, jnp.zeros(b, jnp.int32), cache, kv_len=s)
  last = hidden[jnp.arange(b), lengths - 1]
  return model.logits(params, last), cache


def decode_step(params: Params, cfg: ModelConfig, opts: RunOptions, token: Int[Array, "b"], position: Int[Array, "b"],
                cache: cache_lib.LayerCache) -> tuple[Float[Array, "b v"], cache_lib.LayerCache]:
  """One new token per sequence at its own position; attends to the whole cache (masked by position)."""
  hidden, cache = model.forward(params, cfg, opts, token[:, None], position, cache)
  return model.logits(params, hidden[:, 0]), cache


def _prefill_and_sample(static, params, tokens, lengths, cache, key):
  cfg, opts, sampling = static
  logits, cache = prefill(params, cfg, opts, tokens, lengths, cache)
  return sample(logits, key, sampling), cache


def _step_and_sample(static, params, token, position, cache, key):
  cfg, opts, sampling = static
  logits, cache = decode_step(params, cfg, opts, token, position, cache)
  return sample(logits, key, sampling), cache


_EXECUTABLES: dict = {}


def _compiled(fn, static, *args):
  """Ahead-of-time compiled fn for these static settings and argument shapes, reused across calls."""
  signature = (fn, static, jax.tree.structure(args),
               tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args)))
  if signature not in _EXECUTABLES:
    donate = () if jax.default_backend() == "cpu" else ("cache",)  # CPU buffers cannot be donated
    jitted = jax.jit(fn, static_argnums=0, donate_argnames=donate)
    _EXECUTABLES[signature] = jitted.lower(static, *args).compile()
  return _EXECUTABLES[signature]


def generate(params: Params, cfg: ModelConfig, opts: RunOptions, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: SamplingParams = SamplingParams(), seed: int = 0,
             max_len: int | None = None, stop_at_eos: bool = True) -> GenerationResult:
  lengths_np = np.array([len(p) for p in prompts], np.int32)
  longest = int(lengths_np.max(initial=1))
  if max_len is None:
    max_len = -(-(longest + max_new_tokens) // CACHE_ALIGN) * CACHE_ALIGN
  check_prompts(cfg, prompts, max_new_tokens, max_len)
  b, s = len(prompts), min(-(-longest // PROMPT_ALIGN) * PROMPT_ALIGN, max_len)
  tokens_np = np.zeros((b, s), np.int32)
  for i, p in enumerate(prompts):
    tokens_np[i, :len(p)] = p
  tokens, lengths = jnp.asarray(tokens_np), jnp.asarray(lengths_np)
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, max_len, opts.jnp_dtype, opts.indexer_quant,
                               opts.fp8_latent_cache)
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  prefill_fn = _compiled(_prefill_and_sample, (cfg, opts, sampling), params, tokens, lengths, cache, key)
  step_fn = _compiled(_step_and_sample, (cfg, opts, sampling), params, lengths, lengths, cache, key)
  compile_seconds = time.perf_counter() - t0

  t0 = time.perf_counter()
  token, cache = prefill_fn(params, tokens, lengths, cache, jax.random.fold_in(key, 0))
  token.block_until_ready()
  prefill_seconds = time.perf_counter() - t0

  out = [np.asarray(token)]
  finished = out[0] == cfg.eos_token_id
  t0 = time.perf_counter()
  steps = 0
  for i in range(1, max_new_tokens):
    if stop_at_eos and finished.all():
      break
    token, cache = step_fn(params, token, lengths + (i - 1), cache, jax.random.fold_in(key, i))
    out.append(np.asarray(token))  # the host copy also synchronises, so the timing is honest
    finished |= out[-1] == cfg.eos_token_id
    steps += 1
  decode_seconds = time.perf_counter() - t0

  generated = np.stack(out, axis=1)
  result = []
  for row in generated.tolist():
    if stop_at_eos and cfg.eos_token_id in row:
      row = row[:row.index(cfg.eos_token_id) + 1]
    result.append(row)
  return GenerationResult(result, int(lengths_np.sum()), prefill_seconds, decode_seconds, steps, compile_seconds)
