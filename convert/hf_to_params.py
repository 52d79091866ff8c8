"""Hugging Face checkpoint <-> our parameter pytree as host numpy arrays, in memory.

For small checkpoints (tests, the golden fixtures, ``init-random``); the 671B release goes through the
streaming converter (``convert/converter.py``). Both read through the same plan (``convert/plan.py``):
the same checks, the same names, the same dtypes, the same dequantisation.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from convert.hf_layout import hf_name_grid, mtp_copy_names
from convert.plan import WEIGHT_MODES, job_output, plan_conversion  # noqa: F401  (WEIGHT_MODES: API)
from convert.safetensors_io import CheckpointError, ShardHandles, read_headers, read_source_index
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params, flatten_specs, model_specs


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def read_hf_params(hf_dir, cfg: ModelConfig | None = None, weights: str = "fp8",
                   progress: bool = True) -> tuple[ModelConfig, Params]:
  """Loads a HF checkpoint directory into our pytree (the whole model in memory).

  weights="fp8" keeps the release's e4m3 weights with their block scales; "bf16" dequantises them.
  Float tensors keep their stored dtype. A checkpoint without MTP tensors reads as a model without MTP.
  """
  index = read_source_index(hf_dir)
  cfg = cfg or ModelConfig.from_json(index.dir)
  headers, _ = read_headers(index)
  plan = plan_conversion(cfg, headers, weights, source=str(index.dir))
  handles = ShardHandles(index.dir)
  arrays = {leaf.path: np.empty(leaf.shape, leaf.dtype) for leaf in plan.leaves}
  for job in tqdm(plan.jobs, desc="reading tensors", unit="tensor", disable=not progress):
    arrays[job.leaf][job.index] = job_output(job, handles.get, str(index.dir))
  for check in plan.copy_checks:
    copy = handles.get(check.source)
    if not np.array_equal(copy.view(np.uint8), arrays[check.leaf].view(np.uint8)):
      raise CheckpointError(f"{index.dir}/{check.source.file}: '{check.source.name}' differs from the main model's "
                            f"{check.leaf[0]}; the MTP module is expected to share them")
  params: Params = {}
  for path, array in arrays.items():
    _set(params, path, array)
  return plan.cfg, params


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
