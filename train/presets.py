"""Sizes of the indexer-training workload: the model, the three stages and the evaluations.

- ``test``: a few hundred thousand parameters; unit tests.
- ``cpu-tiny``: ~1.6M parameters (3 layers, 8 experts); the README's end-to-end run on a 2-core CPU
  in a few minutes.
- ``gpu-small``: ~55M parameters (8 layers: 1 dense + 7 MoE with 8 routed experts, 2 active, 1 shared);
  the H100 experiment (``benchmarks/indexer_training.py``), under 8 minutes.

All are V3.2-shaped (MLA with a query latent, the lightning indexer in every layer, dense then MoE
layers with sigmoid group-limited routing and a shared expert); sizes scaled down, no MTP, no YaRN
(``max_seq_len == original_seq_len``).
"""

from __future__ import annotations

import dataclasses

from dsv32_jax.config import ModelConfig
from train.loop import StageConfig


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  model: ModelConfig
  stages: tuple[StageConfig, ...]     # dense pre-training, indexer warm-up, sparse training
  dtype: str = "float32"              # activations ("bfloat16" on a GPU); parameters are float32
  remat: bool = False
  eval_lengths: tuple[int, ...] = (128, 256)
  eval_windows: int = 8               # validation windows per length
  metric_windows: int = 8             # windows for recall / mass / KL
  probe_trials: int = 8               # retrieval-probe sequences per length
  probe_lengths: tuple[int, ...] = (256,)
  ablation_warmup_steps: int = 50     # the harness's per-point warm-up
  ablation_sparse_steps: int = 0      # and sparse steps (0: warm-up only, the main model stays as trained)
  ablation_max_seconds: float | None = None  # wall-time cap of each point's training

  def stage(self, mode: str) -> StageConfig:
    return next(s for s in self.stages if s.mode == mode)

  def replace(self, **changes) -> "Preset":
    return dataclasses.replace(self, **changes)


def _model(**kw) -> ModelConfig:
  base = dict(n_mtp_layers=0, n_shared_experts=1, route_scale=1.0, rope_factor=1.0, rope_theta=10000.0,
              original_seq_len=4096, max_seq_len=4096, bos_token_id=0, eos_token_id=1)
  base.update(kw)
  return ModelConfig(**base)


TEST = Preset(
    name="test",
    model=_model(vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=2,
                 n_routed_experts=4, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                 q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                 index_n_heads=2, index_head_dim=32, index_topk=8),
    stages=(
        StageConfig("dense", "dense", steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=2),
        StageConfig("warmup", "warmup", steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, log_every=2),
        StageConfig("sparse", "sparse", steps=4, batch_size=4, seq_len=32, lr=1e-3, indexer_lr=1e-3, log_every=2),
    ),
    eval_lengths=(32, 64), eval_windows=2, metric_windows=2, probe_trials=2, probe_lengths=(64,),
    ablation_warmup_steps=3,
)

CPU_TINY = Preset(
    name="cpu-tiny",
    model=_model(vocab_size=2048, dim=128, inter_dim=384, moe_inter_dim=96, n_layers=3, n_dense_layers=1,
                 n_heads=4, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                 q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 index_n_heads=4, index_head_dim=32, index_topk=32),
    stages=(
        StageConfig("dense", "dense", steps=200, batch_size=8, seq_len=256, lr=4e-3, warmup_steps=20,
                    log_every=20, ckpt_every=100),
        StageConfig("warmup", "warmup", steps=50, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=5,
                    schedule="constant", weight_decay=0.0, log_every=20),
        StageConfig("sparse", "sparse", steps=40, batch_size=8, seq_len=256, lr=5e-4, indexer_lr=1e-3,
                    log_every=10),
    ),
    eval_lengths=(128, 256, 512), eval_windows=8, metric_windows=8, probe_trials=8, probe_lengths=(256, 512),
    ablation_warmup_steps=40,
)

GPU_SMALL = Preset(
    name="gpu-small",
    model=_model(vocab_size=8192, dim=512, inter_dim=1536, moe_inter_dim=384, n_layers=8, n_dense_layers=1,
                 n_heads=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                 q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                 index_n_heads=8, index_head_dim=64, index_topk=128),
    stages=(
        StageConfig("dense", "dense", steps=1500, batch_size=16, seq_len=1024, grad_accum=1, lr=2e-3,
                    warmup_steps=100, log_every=50, ckpt_every=0, max_seconds=110),
        StageConfig("warmup", "warmup", steps=300, batch_size=16, seq_len=1024, lr=1e-3, warmup_steps=20,
                    schedule="constant", weight_decay=0.0, log_every=25, max_seconds=30),
        StageConfig("sparse", "sparse", steps=300, batch_size=16, seq_len=1024, lr=2e-4, indexer_lr=5e-4,
                    log_every=25, max_seconds=35),
    ),
    dtype="bfloat16", remat=False,
    eval_lengths=(1024, 2048), eval_windows=16, metric_windows=8, probe_trials=16, probe_lengths=(1024,),
    ablation_warmup_steps=200, ablation_max_seconds=25,
)

PRESETS = {p.name: p for p in (TEST, CPU_TINY, GPU_SMALL)}


def preset(name: str) -> Preset:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def n_params(cfg: ModelConfig) -> tuple[int, int]:
  """(total parameters, parameters active per token) of the main model with its indexers, no MTP."""
  from dsv32_jax.params import flatten_specs, model_specs
  import numpy as np
  total = active = 0
  for path, spec in flatten_specs(model_specs(cfg)):
    n = int(np.prod(spec.shape))
    total += n
    if "experts" in path and "gate" not in path:
      n = n * cfg.n_activated_experts // cfg.n_routed_experts
    if path[0] not in ("embed",):
      active += n
  return total, active
