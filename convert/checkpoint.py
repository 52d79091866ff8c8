"""Our checkpoints: an Orbax PyTree checkpoint of the parameter pytree, beside the source config.json.

Layout of CKPT_DIR::

  config.json        the Hugging Face config the weights came with
  dsv32_meta.json    converter version, source directory, weight mode
  params/            Orbax (OCDBT) checkpoint of the pytree of ``dsv32_jax.params``

Conversion writes into a temporary sibling directory and renames it into place at the end, so an
interrupted run never leaves a checkpoint at CKPT_DIR.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from convert.hf_to_params import read_hf_params
from convert.safetensors_io import CheckpointError
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params

FORMAT_VERSION = 1


def save_checkpoint(ckpt_dir: str | Path, cfg: ModelConfig, params: Params, hf_config: dict, meta: dict) -> Path:
  final = Path(ckpt_dir).absolute()
  if final.exists():
    raise FileExistsError(f"{final}: already exists; remove it or choose another directory")
  tmp = final.with_name(final.name + f".tmp-{int(time.time())}")
  tmp.mkdir(parents=True)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", params)
    ckptr.wait_until_finished()
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    (tmp / "dsv32_meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2))
    tmp.rename(final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def convert_hf_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, weights: str = "fp8",
                          progress: bool = True) -> Path:
  """HF release (FP8) or save_pretrained (float) safetensors -> Orbax checkpoint at ckpt_dir."""
  hf_dir = Path(hf_dir)
  cfg, params = read_hf_params(hf_dir, weights=weights, progress=progress)
  hf_config = json.loads((hf_dir / "config.json").read_text())
  meta = {"source": str(hf_dir.absolute()), "weights": weights}
  if cfg.n_mtp_layers != int(hf_config.get("num_nextn_predict_layers", 0)):
    meta["note"] = "the source has no MTP layer tensors (transformers drops them): converted without MTP"
    hf_config["num_nextn_predict_layers"] = cfg.n_mtp_layers
  return save_checkpoint(ckpt_dir, cfg, params, hf_config, meta)


def load_config(ckpt_dir: str | Path) -> ModelConfig:
  return ModelConfig.from_json(Path(ckpt_dir) / "config.json")


def load_checkpoint(ckpt_dir: str | Path, sharding=None) -> tuple[ModelConfig, Params]:
  """Restores (config, params) as jax arrays: on the default device, or placed by `sharding`, a pytree of
  ``jax.sharding.Sharding`` matching the params (each host then reads only its shards)."""
  ckpt_dir = Path(ckpt_dir)
  if not (ckpt_dir / "params").exists():
    raise CheckpointError(f"{ckpt_dir}: not a dsv32-jax checkpoint (no params/ directory); "
                          "convert a Hugging Face checkpoint with `dsv32 convert HF_DIR CKPT_DIR`")
  cfg = load_config(ckpt_dir)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(ckpt_dir / "params")
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if sharding is None:
    sharding = jax.tree.map(lambda _: device, tree)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, np.dtype(m.dtype), sharding=s), tree, sharding)
  return cfg, ckptr.restore(ckpt_dir / "params", target)
