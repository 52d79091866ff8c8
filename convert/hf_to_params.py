"""Hugging Face checkpoint <-> our parameter pytree (host numpy arrays).

Reads the FP8 release (e4m3 weights + ``weight_scale_inv``) and the plain float safetensors that
transformers' ``save_pretrained`` writes; every tensor is checked against the config's shapes and
every source tensor must be used, so a mismatched config or a truncated checkpoint fails loudly.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from convert.hf_layout import hf_name_grid, mtp_copy_names
from convert.safetensors_io import CheckpointError, ShardedReader
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params, flatten_specs, model_specs, scale_shape
from dsv32_jax.quant import FP8

WEIGHT_MODES = ("fp8", "bf16")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _stack(reader: ShardedReader, grid: np.ndarray, inner_shape: tuple[int, ...], kind: str) -> np.ndarray:
  """Reads the tensors named by `grid` and stacks them to grid.shape + inner_shape."""
  arrays = []
  for name in grid.flat:
    a = reader.get(name)
    if tuple(a.shape) != tuple(inner_shape):
      raise CheckpointError(f"{reader.dir}: tensor '{name}' has shape {tuple(a.shape)}, "
                            f"the config implies {tuple(inner_shape)} ({kind})")
    arrays.append(a)
  dtypes = {a.dtype for a in arrays}
  if len(dtypes) > 1:
    raise CheckpointError(f"{reader.dir}: tensors {grid.flat[0]} ... {grid.flat[-1]} mix dtypes {sorted(map(str, dtypes))}")
  if grid.ndim == 0:
    return arrays[0]
  return np.stack(arrays).reshape(*grid.shape, *inner_shape)


def read_hf_params(hf_dir, cfg: ModelConfig | None = None, weights: str = "fp8",
                   progress: bool = True) -> tuple[ModelConfig, Params]:
  """Loads a HF checkpoint directory into our pytree.

  weights="fp8" keeps the release's e4m3 weights with their block scales; "bf16" dequantises them.
  Float tensors keep their stored dtype.
  """
  if weights not in WEIGHT_MODES:
    raise ValueError(f"weights = {weights!r}: expected one of {WEIGHT_MODES}")
  reader = ShardedReader(hf_dir)
  cfg = cfg or ModelConfig.from_json(reader.dir)
  cfg = _without_absent_mtp(reader, cfg)
  leaves = flatten_specs(model_specs(cfg))
  params: dict[str, Any] = {}
  used: set[str] = set()
  for path, spec in tqdm(leaves, desc="reading tensors", unit="param", disable=not progress):
    grid = hf_name_grid(cfg, path)
    inner = spec.shape[grid.ndim:]
    value = _stack(reader, grid, inner, ".".join(path))
    used.update(grid.flat)
    if path[-1] == "weight" and spec.fp8_in_release:
      scale_grid = np.vectorize(lambda n: n + "_scale_inv", otypes=[object])(grid)
      present = [n in reader for n in scale_grid.flat]
      if any(present) and not all(present):
        missing = [n for n, p in zip(scale_grid.flat, present) if not p][:3]
        raise CheckpointError(f"{reader.dir}: some FP8 scales are missing, e.g. {missing}")
      if all(present):
        if value.dtype != FP8:
          raise CheckpointError(f"{reader.dir}: '{grid.flat[0]}' has a weight_scale_inv but dtype {value.dtype}, "
                                "expected float8_e4m3fn")
        scale = _stack(reader, scale_grid, scale_shape(inner), ".".join(path) + " block scales")
        used.update(scale_grid.flat)
        if weights == "bf16":
          from dsv32_jax.quant import dequant_weight
          value = np.asarray(dequant_weight(value, scale, np.float32)).astype(ml_dtypes.bfloat16)
        else:
          _set(params, path[:-1] + ("scale",), scale.astype(np.float32))
      elif value.dtype == FP8:
        raise CheckpointError(f"{reader.dir}: '{grid.flat[0]}' is float8_e4m3fn without a weight_scale_inv")
    elif value.dtype == FP8:
      raise CheckpointError(f"{reader.dir}: '{grid.flat[0]}' is float8_e4m3fn, but the release stores it in float")
    _set(params, path, value)
  _check_mtp_copies(reader, cfg, params, used)
  unknown = sorted(set(reader.names()) - used)
  if unknown:
    raise CheckpointError(f"{reader.dir}: {len(unknown)} tensor(s) not part of a DeepSeek-V3.2 model with this "
                          f"config, e.g. {unknown[:5]} (does config.json match the weights?)")
  return cfg, params


def _without_absent_mtp(reader: ShardedReader, cfg: ModelConfig) -> ModelConfig:
  """transformers does not model the MTP layers and drops them on save; a checkpoint without any of
  their tensors is read as a model without MTP (the release has them: model.layers.{n_layers}.*)."""
  if cfg.n_mtp_layers and not any(n.startswith(f"model.layers.{cfg.n_layers}.") for n in reader.names()):
    return cfg.replace(n_mtp_layers=0)
  return cfg


def _check_mtp_copies(reader: ShardedReader, cfg: ModelConfig, params: Params, used: set[str]) -> None:
  """The MTP layers carry copies of the embedding and head; we keep one and check the copies match."""
  for name, leaf in mtp_copy_names(cfg).items():
    if name not in reader:
      continue
    copy = reader.get(name)
    ours = params[leaf]
    if copy.shape != ours.shape or not np.array_equal(copy.astype(np.float32), ours.astype(np.float32)):
      raise CheckpointError(f"{reader.dir}: '{name}' differs from the main model's {leaf}; the MTP module is "
                            "expected to share them")
    used.add(name)


def _layer_key(name: str) -> tuple[int, str]:
  m = re.match(r"model\.layers\.(\d+)\.", name)
  return (int(m.group(1)) if m else -1, name)


def hf_tensors(cfg: ModelConfig, params: Params, with_mtp_copies: bool = True) -> Iterator[tuple[str, np.ndarray]]:
  """Our pytree as (HF name, array) pairs, layer by layer (the inverse of read_hf_params)."""
  entries = []
  for path, spec in flatten_specs(model_specs(cfg)):
    grid = hf_name_grid(cfg, path)
    node = params
    for k in path[:-1]:
      node = node[k]
    leaf_names = [(path[-1], grid)]
    if path[-1] == "weight" and "scale" in node:
      leaf_names.append(("scale", np.vectorize(lambda n: n + "_scale_inv", otypes=[object])(grid)))
    for leaf, names in leaf_names:
      for index in np.ndindex(names.shape):
        entries.append((names[index], node[leaf], index))
  if with_mtp_copies:
    for name, leaf in mtp_copy_names(cfg).items():
      entries.append((name, params[leaf], ()))
  for name, array, index in sorted(entries, key=lambda e: _layer_key(e[0])):
    yield name, np.asarray(array[index])
