"""Loading our checkpoints: (config, params) restored by Orbax onto one device or any sharding.

The directory layout and how it is written are in ``convert/orbax_layout.py``; the conversion in
``convert/converter.py``. ``load_checkpoint`` hands Orbax a target ``jax.ShapeDtypeStruct`` per array
with the sharding it should have, so Orbax's sharded restore makes each host read only the chunks of
the shards its own devices hold; no host ever materialises the whole model unless asked to.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from convert import orbax_layout
from convert.converter import PARTIAL_SUFFIX, convert_hf_checkpoint  # noqa: F401  (the API since the foundation)
from convert.safetensors_io import CheckpointError
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params


def load_config(ckpt_dir: str | Path) -> ModelConfig:
  return ModelConfig.from_json(Path(ckpt_dir) / orbax_layout.CONFIG_FILE)


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
  """A finalised dsv32-jax checkpoint directory, or a CheckpointError saying what it is instead."""
  ckpt_dir = Path(ckpt_dir)
  if ckpt_dir.name.endswith(PARTIAL_SUFFIX):
    raise CheckpointError(f"{ckpt_dir}: an unfinished conversion, not a checkpoint; finish it with "
                          f"`dsv32 convert HF_DIR {str(ckpt_dir)[:-len(PARTIAL_SUFFIX)]} --resume`")
  if not (ckpt_dir / orbax_layout.PARAMS_DIR).exists():
    raise CheckpointError(f"{ckpt_dir}: not a dsv32-jax checkpoint (no params/ directory); "
                          "convert a Hugging Face checkpoint with `dsv32 convert HF_DIR CKPT_DIR`")
  if not (ckpt_dir / orbax_layout.META_FILE).exists():
    raise CheckpointError(f"{ckpt_dir}: no {orbax_layout.META_FILE}: an incomplete checkpoint")
  meta = json.loads((ckpt_dir / orbax_layout.META_FILE).read_text())
  if meta.get("format_version", 0) > orbax_layout.FORMAT_VERSION:
    raise CheckpointError(f"{ckpt_dir}: checkpoint format {meta['format_version']} is newer than this dsv32-jax "
                          f"reads ({orbax_layout.FORMAT_VERSION}); update dsv32-jax")
  return ckpt_dir


def abstract_params(ckpt_dir: str | Path) -> Params:
  """The checkpoint's pytree as jax.ShapeDtypeStruct leaves (no sharding): a template for shardings."""
  tree = {}
  for path, (shape, dtype) in orbax_layout.stored_leaves(Path(ckpt_dir) / orbax_layout.PARAMS_DIR).items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, dtype)
  return tree


def load_checkpoint(ckpt_dir: str | Path, sharding=None) -> tuple[ModelConfig, Params]:
  """Restores (config, params) as jax arrays: on the default device, or placed by `sharding`, a pytree of
  ``jax.sharding.Sharding`` matching the params (see ``abstract_params``; each host then reads only the
  chunks its devices' shards need)."""
  ckpt_dir = check_checkpoint_dir(ckpt_dir)
  cfg = load_config(ckpt_dir)
  template = abstract_params(ckpt_dir)
  if sharding is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = jax.tree.map(lambda _: device, template)
  try:
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, np.dtype(m.dtype), sharding=s), template, sharding)
  except ValueError as e:
    raise ValueError(f"{ckpt_dir}: the sharding pytree does not match the checkpoint's parameters ({e})") from None
  return cfg, ocp.StandardCheckpointer().restore((ckpt_dir / orbax_layout.PARAMS_DIR).absolute(), target)
