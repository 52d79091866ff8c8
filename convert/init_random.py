"""A random checkpoint in the exact format of the Hugging Face release (for demos and tests).

FP8 e4m3 linear weights with ue8m0 128x128 ``weight_scale_inv`` blocks, bf16 embeddings, norms,
router and indexer ``weights_proj``, float32 ``e_score_correction_bias``, the MTP layers with their
copies of the embedding and head, several shards, ``model.safetensors.index.json`` and ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from convert.hf_to_params import hf_tensors
from convert.safetensors_io import write_sharded
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import init_params


def write_random_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0, fp8: bool = True,
                            n_shards: int = 4) -> Path:
  out = Path(out_dir)
  params = init_params(cfg, seed=seed, fp8=fp8)
  total = sum(a.nbytes for _, a in hf_tensors(cfg, params))
  write_sharded(hf_tensors(cfg, params), out, shard_bytes=max(1, -(-total // n_shards)))
  (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(fp8=fp8), indent=2))
  return out
