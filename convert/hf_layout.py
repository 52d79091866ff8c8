"""Where each array of our parameter pytree lives in the Hugging Face release (and back).

Every leaf path of ``dsv32_jax.params.model_specs`` maps to a grid of HF tensor names: one name for
top-level arrays, one per layer for stacked layers, one per (layer, expert) for routed experts.
The converter stacks a grid into one array; the exporter splits it back.
"""

from __future__ import annotations

import numpy as np

from dsv32_jax.config import ModelConfig

TOP_LEVEL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}

# block-relative module path -> HF module name ({e} = routed expert index)
BLOCK_MODULES = {
    ("attn_norm",): "input_layernorm",
    ("ffn_norm",): "post_attention_layernorm",
    ("attn", "wq_a"): "self_attn.q_a_proj",
    ("attn", "q_norm"): "self_attn.q_a_layernorm",
    ("attn", "wq_b"): "self_attn.q_b_proj",
    ("attn", "wkv_a"): "self_attn.kv_a_proj_with_mqa",
    ("attn", "kv_norm"): "self_attn.kv_a_layernorm",
    ("attn", "wkv_b"): "self_attn.kv_b_proj",
    ("attn", "wo"): "self_attn.o_proj",
    ("attn", "indexer", "wq_b"): "self_attn.indexer.wq_b",
    ("attn", "indexer", "wk"): "self_attn.indexer.wk",
    ("attn", "indexer", "k_norm"): "self_attn.indexer.k_norm",
    ("attn", "indexer", "weights_proj"): "self_attn.indexer.weights_proj",
    ("ffn", "w1"): "mlp.gate_proj",
    ("ffn", "w2"): "mlp.down_proj",
    ("ffn", "w3"): "mlp.up_proj",
    ("ffn", "gate"): "mlp.gate",
    ("ffn", "experts", "w1"): "mlp.experts.{e}.gate_proj",
    ("ffn", "experts", "w2"): "mlp.experts.{e}.down_proj",
    ("ffn", "experts", "w3"): "mlp.experts.{e}.up_proj",
    ("ffn", "shared", "w1"): "mlp.shared_experts.gate_proj",
    ("ffn", "shared", "w2"): "mlp.shared_experts.down_proj",
    ("ffn", "shared", "w3"): "mlp.shared_experts.up_proj",
}

# MTP-module-relative module path -> HF module name (inside model.layers.{n_layers + depth})
MTP_MODULES = {("enorm",): "enorm", ("hnorm",): "hnorm", ("eh_proj",): "eh_proj", ("norm",): "shared_head.norm"}

# The MTP layers repeat the main embedding and head; we keep one copy (the converter checks they match).
MTP_COPIES = {"embed_tokens.weight": "embed", "shared_head.head.weight": "head"}

LEAF_SUFFIX = {"weight": "weight", "scale": "weight_scale_inv", "bias": "bias"}


def _suffix(modules: dict, rel: tuple[str, ...]) -> str:
  """HF name (relative to the layer) of a block-relative leaf path."""
  if rel in modules:  # a bare array: a norm weight
    return f"{modules[rel]}.weight"
  module, leaf = rel[:-1], rel[-1]
  if module not in modules or leaf not in LEAF_SUFFIX:
    raise KeyError(f"no Hugging Face name for parameter path {'.'.join(rel)}")
  if module == ("ffn", "gate") and leaf == "bias":
    return "mlp.gate.e_score_correction_bias"
  return f"{modules[module]}.{LEAF_SUFFIX[leaf]}"


def hf_name_grid(cfg: ModelConfig, path: tuple[str, ...]) -> np.ndarray:
  """Names of the HF tensors that make up the leaf at `path`, shaped like its stacked leading axes."""
  group, rel = path[0], path[1:]
  if group in TOP_LEVEL and not rel:
    return np.array(TOP_LEVEL[group], dtype=object)
  if group == "dense_layers":
    layers, modules = range(cfg.n_dense_layers), BLOCK_MODULES
  elif group == "moe_layers":
    layers, modules = range(cfg.n_dense_layers, cfg.n_layers), BLOCK_MODULES
  elif group == "mtp":
    layers = range(cfg.n_layers, cfg.n_layers + cfg.n_mtp_layers)
    if rel[0] == "block":
      rel, modules = rel[1:], BLOCK_MODULES
    else:
      modules = MTP_MODULES
  else:
    raise KeyError(f"no Hugging Face name for parameter path {'.'.join(path)}")
  suffix = _suffix(modules, rel)
  if "{e}" in suffix:
    grid = [[f"model.layers.{i}.{suffix.format(e=e)}" for e in range(cfg.n_routed_experts)] for i in layers]
  else:
    grid = [f"model.layers.{i}.{suffix}" for i in layers]
  return np.array(grid, dtype=object)


def mtp_copy_names(cfg: ModelConfig) -> dict[str, str]:
  """HF names of the MTP layers' copies of the embedding and head -> the top-level leaf they copy."""
  return {f"model.layers.{cfg.n_layers + d}.{name}": leaf
          for d in range(cfg.n_mtp_layers) for name, leaf in MTP_COPIES.items()}
