"""Config: presets, both HF rope spellings, validation errors that name the field."""

import json
import math

import pytest

from dsv32_jax.config import PRESETS, ConfigError, ModelConfig, preset
from dsv32_jax.rope import yarn_correction_range
from tests.conftest import GOLDEN

RELEASE_CONFIG = {  # the release's config.json (values from ../shared/reference-code-notes.md section 1)
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 2048, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}


def test_release_config_is_the_671b_preset():
  assert ModelConfig.from_hf_dict(RELEASE_CONFIG) == preset("v32-671b")


def test_671b_derived_constants():
  cfg = preset("v32-671b")
  assert yarn_correction_range(cfg) == (10, 23)
  assert cfg.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-15)
  m = 0.1 * math.log(40) + 1
  assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-15)
  assert cfg.n_moe_layers == 58


def test_transformers5_rope_parameters_spelling():
  hf = json.loads(open(f"{GOLDEN}/tiny_b/config.json").read())
  assert "rope_parameters" in hf and "rope_scaling" not in hf
  cfg = ModelConfig.from_hf_dict(hf)
  assert (cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow) == (40.0, 4096, 32.0, 1.0)
  old = dict(hf)
  rope = dict(old.pop("rope_parameters"))
  old["rope_theta"] = rope.pop("rope_theta")
  old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
  assert ModelConfig.from_hf_dict(old) == cfg


def test_round_trip_through_hf_dict():
  for cfg in PRESETS.values():
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"index_topk": None}, "index_topk"),
    ({"n_group": 3}, "not divisible by n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"scoring_func": "softmax"}, "sigmoid"),
    ({"first_k_dense_replace": 70}, "first_k_dense_replace"),
    ({"index_head_dim": 96}, "power of two"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"quantization_config": {"weight_block_size": [64, 64]}}, "128x128"),
])
def test_invalid_configs_name_the_field(change, message):
  hf = dict(RELEASE_CONFIG)
  for k, v in change.items():
    if v is None:
      hf.pop(k)
    else:
      hf[k] = v
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_hf_dict(hf)


def test_too_few_experts_in_kept_groups():
  with pytest.raises(ConfigError, match="could not pick enough experts"):
    preset("tiny").replace(n_limited_groups=1, n_activated_experts=6)


def test_unknown_preset_and_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="unknown preset"):
    preset("v4")
  with pytest.raises(ConfigError, match="no such file"):
    ModelConfig.from_json(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not valid JSON"):
    ModelConfig.from_json(tmp_path)
