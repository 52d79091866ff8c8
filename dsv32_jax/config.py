"""Model configuration: one frozen dataclass, read from a Hugging Face ``config.json``.

Field names follow DeepSeek's official ``inference/model.py`` (``ModelArgs``); the Hugging Face
names they are read from are given beside each field (see ``docs/architecture.md`` and
``../shared/reference-spec.md`` section 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

FP8_BLOCK = 128  # block edge of the release's FP8 weight scales and of act_quant


class ConfigError(ValueError):
  """A config.json (or preset override) that cannot describe a DeepSeek-V3.2 model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3.2 architecture. Defaults are the released 671B values."""

  vocab_size: int = 129280                  # vocab_size
  dim: int = 7168                           # hidden_size
  inter_dim: int = 18432                    # intermediate_size (dense FFN of the first layers)
  moe_inter_dim: int = 2048                 # moe_intermediate_size
  n_layers: int = 61                        # num_hidden_layers
  n_dense_layers: int = 3                   # first_k_dense_replace
  n_mtp_layers: int = 1                     # num_nextn_predict_layers
  n_heads: int = 128                        # num_attention_heads
  # MoE
  n_routed_experts: int = 256               # n_routed_experts
  n_shared_experts: int = 1                 # n_shared_experts
  n_activated_experts: int = 8              # num_experts_per_tok
  n_expert_groups: int = 8                  # n_group
  n_limited_groups: int = 4                 # topk_group
  route_scale: float = 2.5                  # routed_scaling_factor
  score_func: str = "sigmoid"               # scoring_func
  # MLA
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # YaRN RoPE
  rope_theta: float = 10000.0               # rope_theta
  rope_factor: float = 40.0                 # rope_scaling.factor
  original_seq_len: int = 4096              # rope_scaling.original_max_position_embeddings
  beta_fast: float = 32.0                   # rope_scaling.beta_fast
  beta_slow: float = 1.0                    # rope_scaling.beta_slow
  mscale: float = 1.0                       # rope_scaling.mscale (== mscale_all_dim in the release)
  max_seq_len: int = 163840                 # max_position_embeddings
  # Lightning indexer (DSA)
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 2048
  # Misc
  norm_eps: float = 1e-6                    # rms_norm_eps (the indexer's LayerNorm uses it too)
  bos_token_id: int = 0
  eos_token_id: int = 1

  def __post_init__(self):
    validate(self)

  # -- derived sizes ------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def yarn_active(self) -> bool:
    """The official code applies YaRN (frequencies and mscale) only beyond the original length."""
    return self.max_seq_len > self.original_seq_len

  @property
  def softmax_scale(self) -> float:
    """MLA score scale: qk_head_dim**-0.5 * m**2, m = 0.1 * mscale * ln(rope_factor) + 1."""
    scale = self.qk_head_dim ** -0.5
    if self.yarn_active:
      m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
      scale = scale * m * m
    return scale

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # -- Hugging Face config.json ---------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
    """Reads both the release's ``rope_scaling`` and transformers 5's ``rope_parameters``."""
    def need(key):
      if key not in hf:
        raise ConfigError(f"{source}: missing field '{key}' (needed for DeepSeek-V3.2)")
      return hf[key]

    model_type = hf.get("model_type")
    if model_type not in (None, "deepseek_v32", "deepseek_v3"):
      raise ConfigError(f"{source}: model_type is '{model_type}', expected 'deepseek_v32'")
    for key in ("index_n_heads", "index_head_dim", "index_topk"):
      need(key)  # DSA fields: a plain DeepSeek-V3 config has none of them
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in ("yarn", None, "default"):
      raise ConfigError(f"{source}: rope type '{rope_type}' is not supported (DeepSeek-V3.2 uses 'yarn')")
    yarn = rope_type == "yarn"
    if yarn and rope.get("mscale_all_dim", rope.get("mscale", 1.0)) != rope.get("mscale", 1.0):
      raise ConfigError(
          f"{source}: rope mscale {rope.get('mscale')} != mscale_all_dim {rope.get('mscale_all_dim')};"
          " the official code has one mscale")
    max_pos = int(need("max_position_embeddings"))
    original = int(rope.get("original_max_position_embeddings", max_pos)) if yarn else max_pos
    quant = hf.get("quantization_config")
    if quant is not None:
      block = quant.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
      if list(block) != [FP8_BLOCK, FP8_BLOCK] or quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: quantization_config {quant} is not FP8 e4m3 with 128x128 blocks")
    n_routed = int(need("n_routed_experts"))
    return cls(
        vocab_size=int(need("vocab_size")),
        dim=int(need("hidden_size")),
        inter_dim=int(need("intermediate_size")),
        moe_inter_dim=int(need("moe_intermediate_size")),
        n_layers=int(need("num_hidden_layers")),
        n_dense_layers=int(hf.get("first_k_dense_replace", 0)),
        n_mtp_layers=int(hf.get("num_nextn_predict_layers", 0)),
        n_heads=int(need("num_attention_heads")),
        n_routed_experts=n_routed,
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        n_activated_experts=int(need("num_experts_per_tok")),
        n_expert_groups=int(hf.get("n_group", 1)),
        n_limited_groups=int(hf.get("topk_group", 1)),
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        score_func=str(hf.get("scoring_func", "sigmoid")),
        q_lora_rank=int(need("q_lora_rank") or 0),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        rope_theta=float(rope_theta),
        rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
        original_seq_len=original,
        beta_fast=float(rope.get("beta_fast", 32.0)),
        beta_slow=float(rope.get("beta_slow", 1.0)),
        mscale=float(rope.get("mscale", 1.0)),
        max_seq_len=max_pos,
        index_n_heads=int(hf["index_n_heads"]),
        index_head_dim=int(hf["index_head_dim"]),
        index_topk=int(hf["index_topk"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bos_token_id=int(hf.get("bos_token_id", 0) or 0),
        eos_token_id=_first(hf.get("eos_token_id", 1)),
    )

  @classmethod
  def from_json(cls, path: str | Path) -> "ModelConfig":
    path = Path(path)
    if path.is_dir():
      path = path / "config.json"
    try:
      hf = json.loads(path.read_text())
    except FileNotFoundError:
      raise ConfigError(f"{path}: no such file (expected a Hugging Face config.json)") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, source=str(path))

  def to_hf_dict(self, fp8: bool = True) -> dict[str, Any]:
    """The release's config.json spelling (``rope_scaling``, ``quantization_config``)."""
    hf = {
        "architectures": ["DeepseekV32ForCausalLM"],
        "model_type": "deepseek_v32",
        "vocab_size": self.vocab_size,
        "hidden_size": self.dim,
        "intermediate_size": self.inter_dim,
        "moe_intermediate_size": self.moe_inter_dim,
        "num_hidden_layers": self.n_layers,
        "num_nextn_predict_layers": self.n_mtp_layers,
        "first_k_dense_replace": self.n_dense_layers,
        "moe_layer_freq": 1,
        "num_attention_heads": self.n_heads,
        "num_key_value_heads": self.n_heads,
        "n_routed_experts": self.n_routed_experts,
        "n_shared_experts": self.n_shared_experts,
        "num_experts_per_tok": self.n_activated_experts,
        "n_group": self.n_expert_groups,
        "topk_group": self.n_limited_groups,
        "routed_scaling_factor": self.route_scale,
        "scoring_func": self.score_func,
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "q_lora_rank": self.q_lora_rank,
        "kv_lora_rank": self.kv_lora_rank,
        "qk_nope_head_dim": self.qk_nope_head_dim,
        "qk_rope_head_dim": self.qk_rope_head_dim,
        "v_head_dim": self.v_head_dim,
        "index_n_heads": self.index_n_heads,
        "index_head_dim": self.index_head_dim,
        "index_topk": self.index_topk,
        "max_position_embeddings": self.max_seq_len,
        "rope_theta": self.rope_theta,
        "rope_scaling": {
            "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_seq_len,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            "mscale": self.mscale, "mscale_all_dim": self.mscale,
        },
        "rms_norm_eps": self.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    if fp8:
      hf["quantization_config"] = {
          "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "scale_fmt": "ue8m0",
      }
    return hf


def _first(v) -> int:
  return int(v[0] if isinstance(v, (list, tuple)) else v)


def validate(c: ModelConfig) -> None:
  """Raises ConfigError naming the field for a config that cannot describe a V3.2 model."""
  def fail(msg):
    raise ConfigError(f"invalid DeepSeek-V3.2 config: {msg}")

  for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "index_n_heads", "index_head_dim", "index_topk", "max_seq_len"):
    if getattr(c, name) <= 0:
      fail(f"{name} = {getattr(c, name)} must be positive")
  if c.q_lora_rank <= 0:
    fail("q_lora_rank must be positive: the lightning indexer reads the MLA query latent qr")
  if not 0 <= c.n_dense_layers <= c.n_layers:
    fail(f"first_k_dense_replace = {c.n_dense_layers} must lie in [0, num_hidden_layers = {c.n_layers}]")
  if c.n_mtp_layers < 0:
    fail(f"num_nextn_predict_layers = {c.n_mtp_layers} must be >= 0")
  if c.n_moe_layers > 0 or c.n_mtp_layers > 0:
    if c.n_routed_experts <= 0:
      fail("n_routed_experts must be positive when there are MoE layers")
    if not 0 < c.n_activated_experts <= c.n_routed_experts:
      fail(f"num_experts_per_tok = {c.n_activated_experts} must lie in [1, n_routed_experts = {c.n_routed_experts}]")
    if c.n_expert_groups <= 0 or c.n_routed_experts % c.n_expert_groups:
      fail(f"n_routed_experts = {c.n_routed_experts} is not divisible by n_group = {c.n_expert_groups}")
    if not 0 < c.n_limited_groups <= c.n_expert_groups:
      fail(f"topk_group = {c.n_limited_groups} must lie in [1, n_group = {c.n_expert_groups}]")
    per_group = c.n_routed_experts // c.n_expert_groups
    if c.n_expert_groups > 1 and per_group < 2:
      fail(f"group-limited routing sums the top-2 scores of a group: {per_group} expert(s) per group")
    if c.n_limited_groups * per_group < c.n_activated_experts:
      fail(f"topk_group * experts per group = {c.n_limited_groups * per_group} < "
           f"num_experts_per_tok = {c.n_activated_experts}: routing could not pick enough experts")
  if c.score_func != "sigmoid":
    fail(f"scoring_func = '{c.score_func}': DeepSeek-V3.2 routes with 'sigmoid'")
  if c.qk_rope_head_dim % 2:
    fail(f"qk_rope_head_dim = {c.qk_rope_head_dim} must be even (RoPE rotates pairs)")
  if c.index_head_dim <= c.qk_rope_head_dim:
    fail(f"index_head_dim = {c.index_head_dim} must exceed qk_rope_head_dim = {c.qk_rope_head_dim}"
         " (the indexer ropes its first qk_rope_head_dim dims)")
  if c.index_head_dim & (c.index_head_dim - 1):
    fail(f"index_head_dim = {c.index_head_dim} must be a power of two (Hadamard rotation)")
  if c.rope_factor < 1.0:
    fail(f"rope_scaling.factor = {c.rope_factor} must be >= 1")
  if c.original_seq_len <= 0:
    fail("rope_scaling.original_max_position_embeddings must be positive")


PRESETS: dict[str, ModelConfig] = {
    # Every value of config_671B_v3.2.json and the release's config.json.
    "v32-671b": ModelConfig(),
    # A tiny model of the same structure: FP8 block sizes, indexer head dim and rope dim as released,
    # so that every quantisation path (partial weight blocks included: wkv_a has 192 rows) is exercised.
    "tiny": ModelConfig(
        vocab_size=1024, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=4, n_dense_layers=1,
        n_mtp_layers=1, n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.5, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, rope_factor=40.0,
        original_seq_len=128, max_seq_len=4096, index_n_heads=4, index_head_dim=128, index_topk=32,
    ),
}


def preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}") from None
