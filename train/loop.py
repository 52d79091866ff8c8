"""The training loop of the three stages: optax AdamW, schedules, gradient accumulation, Orbax resume.

One ``StageConfig`` describes a stage. Which parameters it trains follows from its mode:

====================  =====================================  ====================================
mode                  trained (AdamW)                        loss
====================  =====================================  ====================================
``"dense"``           the main model                         LM cross-entropy, dense attention
``"warmup"``          the indexers (main model frozen)       sum over layers of the dense KL
``"sparse"``          main model (``lr``) and indexers       LM (main) + sum of the KL on S_t
                      (``indexer_lr``)                       (indexers); gradients isolated
====================  =====================================  ====================================

The frozen part gets ``optax.set_to_zero``. Each trained part has its own clipping and AdamW (decoupled
weight decay on matrices only) with a linear warm-up then cosine / linear / constant decay. The MoE gate
bias is no gradient parameter: with the main model trained it follows DeepSeek-V3's auxiliary-loss-free
balancing, ``bias += gamma * sign(mean load - load)`` after each step.

The jitted step runs ``grad_accum`` micro-batches under ``lax.scan`` and averages their gradients.
State = {params, opt_state, step} is saved with an Orbax ``CheckpointManager`` in
``workdir/<stage name>/``; a stage restarted on the same workdir restores the latest step and, as
batches are a function of (seed, step), continues exactly as an uninterrupted run would. A stage that
ended (all its steps, or its ``max_seconds``) leaves ``<stage name>.done.json`` and is then only restored. Progress: a
tqdm bar with loss, grad norm and tokens/s; every logged step also goes to ``<stage>.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params
from train import losses
from train.data import windows
from train.forward import forward
from train.selector import IndexerVariant

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  name: str
  mode: str                         # "dense" | "warmup" | "sparse"
  steps: int
  batch_size: int                   # sequences per optimizer step (over all micro-batches)
  seq_len: int
  grad_accum: int = 1               # micro-batches per step
  lr: float = 1e-3                  # peak lr of the main model ("dense", "sparse") or of the indexers ("warmup")
  indexer_lr: float | None = None   # "sparse": the indexers' peak lr (default: lr)
  warmup_steps: int = 0
  schedule: str = "cosine"
  final_lr_ratio: float = 0.1       # lr at the last step / peak
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  bias_update: float = 1e-3         # gamma of the auxiliary-loss-free balancing (0: off)
  log_every: int = 10
  ckpt_every: int = 0               # save every this many steps (0: at the end only)
  max_seconds: float | None = None  # stop early after this much wall time (the GPU script's budget)
  seed: int = 0

  def __post_init__(self):
    if self.mode not in ("dense", "warmup", "sparse"):
      raise ValueError(f"StageConfig.mode = {self.mode!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"StageConfig.schedule = {self.schedule!r}: expected one of {SCHEDULES}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")

  def replace(self, **changes) -> "StageConfig":
    return dataclasses.replace(self, **changes)

  @property
  def trains_main(self) -> bool:
    return self.mode in ("dense", "sparse")

  @property
  def trains_indexer(self) -> bool:
    return self.mode in ("warmup", "sparse")


# -- parameters -------------------------------------------------------------------------------------


def float_params(params: Params, dtype=jnp.float32) -> Params:
  """Training copies of the parameters: float32 masters (no FP8 linears: use init_params(fp8=False))."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if any(getattr(k, "key", None) == "scale" for path, _ in flat for k in path):
    raise ValueError("FP8 block-scaled weights cannot be trained: initialise with init_params(cfg, fp8=False)")
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def param_labels(params: Params) -> Any:
  """'indexer' (under attn.indexer), 'gate_bias' (the MoE gate bias) or 'main', per leaf."""
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    if "indexer" in keys:
      return "indexer"
    if keys[-2:] == ["gate", "bias"]:
      return "gate_bias"
    return "main"
  return jax.tree_util.tree_map_with_path(label, params)


def indexer_params(params: Params) -> dict:
  """The indexers' subtree of each layer stack: {stack: attn.indexer}."""
  return {k: params[k]["attn"]["indexer"] for k in ("dense_layers", "moe_layers") if k in params}


def with_indexers(params: Params, indexers: dict) -> Params:
  """params with each stack's attn.indexer replaced (e.g. an indexer of another shape for an ablation)."""
  out = dict(params)
  for k, idx in indexers.items():
    out[k] = {**params[k], "attn": {**params[k]["attn"], "indexer": idx}}
  return out


def schedule(stage: StageConfig, peak: float) -> optax.Schedule:
  warm = max(stage.warmup_steps, 0)
  decay_steps = max(stage.steps - warm, 1)
  end = peak * stage.final_lr_ratio
  if stage.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=stage.final_lr_ratio)
  elif stage.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if not warm:
    return decay
  return optax.join_schedules([optax.linear_schedule(peak / warm, peak, warm), decay], [warm])


def optimizer(stage: StageConfig, params: Params) -> optax.GradientTransformation:
  """Per group: clip by global norm, then AdamW at unit learning rate (decoupled decay on matrices only).

  The learning rate multiplies the updates in the step (``learning_rates``): schedules run on the host,
  so one compiled step serves every stage length, schedule and peak rate.
  """
  decay_mask = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)  # noqa: E731  matrices only
  adamw = optax.chain(optax.clip_by_global_norm(stage.clip_norm),
                      optax.adamw(1.0, b1=stage.b1, b2=stage.b2, weight_decay=stage.weight_decay, mask=decay_mask))
  frozen = optax.set_to_zero()
  return optax.multi_transform({"main": adamw if stage.trains_main else frozen,
                                "indexer": adamw if stage.trains_indexer else frozen,
                                "gate_bias": frozen}, param_labels(params))


def learning_rates(stage: StageConfig, step: int) -> dict[str, np.float32]:
  """The scheduled learning rate of each parameter group at `step` (0 for a frozen group)."""
  main = float(schedule(stage, stage.lr)(step)) if stage.trains_main else 0.0
  peak = stage.lr if stage.mode == "warmup" else (stage.indexer_lr or stage.lr)
  idx = float(schedule(stage, peak)(step)) if stage.trains_indexer else 0.0
  return {"main": np.float32(main), "indexer": np.float32(idx), "gate_bias": np.float32(0.0)}


def _group_norm(grads, labels, group: str):
  sq = jax.tree.map(lambda g, l: jnp.sum(jnp.square(g.astype(jnp.float32))) if l == group else 0.0, grads, labels)
  return jnp.sqrt(sum(jax.tree.leaves(sq)))


def balance_gate_bias(params: Params, load, gamma: float) -> Params:
  """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others'."""
  if "moe_layers" not in params or gamma == 0:
    return params
  gate = params["moe_layers"]["ffn"]["gate"]
  bias = gate["bias"] + gamma * jnp.sign(load.mean(-1, keepdims=True) - load).astype(gate["bias"].dtype)
  return {**params, "moe_layers": {**params["moe_layers"],
                                   "ffn": {**params["moe_layers"]["ffn"], "gate": {**gate, "bias": bias}}}}


# -- the step --------------------------------------------------------------------------------------


def loss_fn(params: Params, cfg: ModelConfig, v: IndexerVariant, mode: str, tokens, dtype, remat: bool = False):
  """(the stage's loss, metrics) on a batch of token windows [B, S+1]."""
  logits, aux = forward(params, cfg, v, tokens[:, :-1], mode, dtype, remat=remat)
  lm = losses.lm_loss(logits, tokens[:, 1:])
  kl = aux["kl"].sum()
  loss = kl if mode == "warmup" else (lm + kl if mode == "sparse" else lm)
  return loss, {"loss": loss, "lm_loss": lm, "kl": kl, "kl_layers": aux["kl"], "expert_load": aux["expert_load"]}


def make_train_step(cfg: ModelConfig, v: IndexerVariant, stage: StageConfig, params: Params, dtype=jnp.float32,
                    remat: bool = False) -> Callable:
  """jit(step)(state, tokens [grad_accum, micro, S+1], learning rates) -> (state, metrics).

  Memoised on what the compiled step depends on (not the stage's name, length or schedule).
  """
  key = (cfg, v, stage.mode, stage.clip_norm, stage.b1, stage.b2, stage.weight_decay, stage.bias_update,
         jnp.dtype(dtype).name, remat, jax.tree.structure(params))
  return _compiled_step(key, cfg, v, stage, params, dtype, remat)


_STEPS: dict = {}


def _compiled_step(key, cfg, v, stage, params, dtype, remat):
  if key in _STEPS:
    return _STEPS[key]
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  opt = optimizer(stage, params)
  labels = param_labels(params)

  def step(state, tokens, lrs):
    params = state["params"]

    def micro(acc, batch):
      (_, m), g = grad_fn(params, cfg, v, stage.mode, batch, dtype, remat)
      return jax.tree.map(jnp.add, acc, (g, m)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, cfg, v, stage.mode, tokens[0], dtype,
                                                                         remat)))
    (grads, metrics), _ = jax.lax.scan(micro, (zeros[1], zeros[0][1]), tokens)
    n = tokens.shape[0]
    grads = jax.tree.map(lambda g: g / n, grads)
    load = metrics.pop("expert_load")
    metrics = jax.tree.map(lambda m: m / n, metrics)
    updates, opt_state = opt.update(grads, state["opt_state"], params)
    updates = jax.tree.map(lambda u, label: u * lrs[label].astype(u.dtype), updates, labels)
    params = optax.apply_updates(params, updates)
    if stage.trains_main:
      params = balance_gate_bias(params, load, stage.bias_update)
    metrics["grad_norm_main"] = _group_norm(grads, labels, "main")
    metrics["grad_norm_indexer"] = _group_norm(grads, labels, "indexer")
    metrics["expert_imbalance"] = (load.max(-1) / jnp.maximum(load.mean(-1), 1)).mean() if load.size else 0.0
    metrics["lr_main"], metrics["lr_indexer"] = lrs["main"], lrs["indexer"]
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  _STEPS[key] = jax.jit(step, donate_argnums=0)
  return _STEPS[key]


# -- the loop --------------------------------------------------------------------------------------


def stage_batch(stream: np.ndarray, stage: StageConfig, step: int) -> np.ndarray:
  """The token windows of one optimizer step: int32 [grad_accum, micro, seq_len + 1], fixed by (seed, step)."""
  w = windows(stream, step, stage.batch_size, stage.seq_len + 1, stage.seed)
  return w.reshape(stage.grad_accum, stage.batch_size // stage.grad_accum, stage.seq_len + 1)


@dataclasses.dataclass
class StageResult:
  params: Params
  steps_done: int
  history: list[dict]
  seconds: float
  compile_seconds: float
  tokens_per_second: float


def train_stage(params: Params, cfg: ModelConfig, v: IndexerVariant, stage: StageConfig, stream: np.ndarray,
                workdir: str | Path, dtype=jnp.float32, remat: bool = False, progress: bool = True,
                stop_after: int | None = None, mesh: jax.sharding.Mesh | None = None) -> StageResult:
  """Trains one stage from params (or from the stage's latest checkpoint in workdir) and saves it.

  stop_after: leave after this many steps in total (a deliberate interruption, for resume tests).
  mesh: optional; the batch is sharded over its ``"data"`` axis and the state replicated (data parallel).
  """
  workdir = Path(workdir).absolute()
  opt = optimizer(stage, params)
  params = jax.tree.map(jnp.array, params)  # the step donates its state: never the caller's arrays
  state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
  mngr = ocp.CheckpointManager(workdir / stage.name, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if mngr.latest_step() is not None:
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), state)))
  start = int(state["step"])
  log_path = workdir / f"{stage.name}.jsonl"
  done_path = workdir / f"{stage.name}.done.json"
  if done_path.exists() and start == json.loads(done_path.read_text())["steps"]:
    # finished before (all steps, or stopped by its time cap): restored as it ended, not trained further
    history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    info = json.loads(done_path.read_text())
    return StageResult(state["params"], start, history, info["seconds"], info["compile_seconds"],
                       info["tokens_per_second"])
  step_fn = make_train_step(cfg, v, stage, params, dtype, remat)
  batch_sharding = None
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    state = jax.device_put(state, NamedSharding(mesh, P()))
  tokens_per_step = stage.batch_size * stage.seq_len
  history, t_start, compile_s, timed_out = [], time.perf_counter(), 0.0, False
  t_log, steps_since_log = None, 0
  end = stage.steps if stop_after is None else min(stage.steps, stop_after)
  bar = tqdm(total=stage.steps, initial=start, desc=stage.name, disable=not progress, dynamic_ncols=True)
  with open(log_path, "a") as log:
    for i in range(start, end):
      batch = stage_batch(stream, stage, i)
      batch = jax.device_put(batch, batch_sharding) if batch_sharding else batch
      state, metrics = step_fn(state, batch, learning_rates(stage, i))
      steps_since_log += 1
      if t_log is None:  # the first step includes compilation
        jax.block_until_ready(metrics["loss"])
        compile_s = time.perf_counter() - t_start
        t_log, steps_since_log = time.perf_counter(), 0
      timed_out = stage.max_seconds is not None and time.perf_counter() - t_start > stage.max_seconds
      if (i + 1) % stage.log_every == 0 or i + 1 == end or timed_out:  # a stage stopped by its time cap logs its last step too
        m = jax.device_get(metrics)
        now = time.perf_counter()
        tps = steps_since_log * tokens_per_step / max(now - t_log, 1e-9) if steps_since_log else float("nan")
        t_log, steps_since_log = now, 0
        row = {"stage": stage.name, "step": i + 1, "tokens_per_s": tps,
               **{k: (np.asarray(val).tolist()) for k, val in m.items()}}
        history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{row['loss']:.4f}", lm=f"{row['lm_loss']:.3f}", kl=f"{row['kl']:.4f}",
                        gnorm=f"{row['grad_norm_main' if stage.trains_main else 'grad_norm_indexer']:.3f}",
                        tok_s=f"{tps:,.0f}")
      bar.update(1)
      if stage.ckpt_every and (i + 1) % stage.ckpt_every == 0 and i + 1 < end:
        mngr.save(i + 1, args=ocp.args.StandardSave(state))
      if timed_out:
        break
  bar.close()
  done = int(state["step"])
  if mngr.latest_step() != done:
    mngr.save(done, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  seconds = time.perf_counter() - t_start
  steady = [r["tokens_per_s"] for r in history if np.isfinite(r["tokens_per_s"])]
  tps = float(np.mean(steady)) if steady else 0.0
  if done == stage.steps or timed_out:
    done_path.write_text(json.dumps({"steps": done, "planned_steps": stage.steps, "timed_out": timed_out,
                                     "seconds": seconds, "compile_seconds": compile_s, "tokens_per_second": tps}))
  return StageResult(state["params"], done, history, seconds, compile_s, tps)
