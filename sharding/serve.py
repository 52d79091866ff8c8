"""Prefill and decode under ``jax.jit`` with explicit input and output shardings.

The functions jitted are ``dsv32_jax.generate.prefill`` and ``decode_step`` themselves, run with
``RunOptions(sharding=plan)``: the plan pins the residual stream to its layout at each layer boundary
and runs the MoE expert-parallel; parameters, cache, tokens and logits are placed by the rules. Inputs
may be real arrays or ``jax.ShapeDtypeStruct``s (for ahead-of-time compilation without weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from dsv32_jax import generate
from dsv32_jax.config import ModelConfig
from dsv32_jax.options import RunOptions
from sharding import rules as rules_lib
from sharding.plan import ShardingPlan, cache_shardings, param_shardings


def with_plan(opts: RunOptions, plan: ShardingPlan) -> RunOptions:
  return opts.replace(sharding=plan)


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """A jitted prefill or decode step and the shardings of its arguments and results."""

  fn: Any                 # jax.jit(...) with in/out shardings; call or .lower(...).compile()
  in_shardings: tuple
  out_shardings: tuple

  def __call__(self, *args):
    return self.fn(*args)

  def lower(self, *args):
    return self.fn.lower(*args)


def _donate(donate_cache: bool | None) -> tuple[int, ...]:
  if donate_cache is None:  # the cache is updated in place, except on CPU (its buffers cannot be donated)
    donate_cache = jax.default_backend() != "cpu"
  return (3,) if donate_cache else ()


def prefill_step(plan: ShardingPlan, cfg: ModelConfig, opts: RunOptions, params, cache, batch: int,
                 seq: int, donate_cache: bool | None = None) -> ShardedStep:
  """(params, tokens [B,S], lengths [B], cache) -> (logits at each prompt's last token [B,V], cache)."""
  opts = with_plan(opts, plan)
  p_sh, c_sh = param_shardings(plan, cfg, params), cache_shardings(plan, cache)
  tok_sh = plan.named(rules_lib.TOKENS, (batch, seq))
  len_sh = plan.named(("batch",), (batch,))
  logits_sh = plan.named(rules_lib.LOGITS, (batch, cfg.vocab_size))

  def fn(params, tokens, lengths, cache):
    return generate.prefill(params, cfg, opts, tokens, lengths, cache)

  ins, outs = (p_sh, tok_sh, len_sh, c_sh), (logits_sh, c_sh)
  return ShardedStep(jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=_donate(donate_cache)), ins, outs)


def decode_step(plan: ShardingPlan, cfg: ModelConfig, opts: RunOptions, params, cache, batch: int,
                donate_cache: bool | None = None) -> ShardedStep:
  """(params, token [B], position [B], cache) -> (logits [B,V], cache)."""
  opts = with_plan(opts, plan)
  p_sh, c_sh = param_shardings(plan, cfg, params), cache_shardings(plan, cache)
  vec_sh = plan.named(("batch",), (batch,))
  logits_sh = plan.named(rules_lib.LOGITS, (batch, cfg.vocab_size))

  def fn(params, token, position, cache):
    return generate.decode_step(params, cfg, opts, token, position, cache)

  ins, outs = (p_sh, vec_sh, vec_sh, c_sh), (logits_sh, c_sh)
  return ShardedStep(jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=_donate(donate_cache)), ins, outs)


def put(x, sharding):
  """A host or single-device array placed with `sharding` (every process passes the same value)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) sharded array gathered to a numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


