"""``dsv32 export CKPT_DIR HF_DIR``: our checkpoint back to the Hugging Face release format.

The inverse of the converter, from what the checkpoint records (``source_index.json``): the same tensor
names in the same shard files with the same safetensors metadata, ``config.json`` and
``model.safetensors.index.json`` as they were. Each shard is rebuilt from its slices (read with
TensorStore) and written with ``safetensors.numpy.save_file``, which serialises deterministically, so
a ``--weights fp8`` conversion exports to files bit-identical to the source whenever the source was
written by safetensors (as the release is). A ``--weights bf16`` checkpoint exports bf16 weights
without block scales (and a config without ``quantization_config``): the same model, not the same bytes.

Memory: one output shard at a time (safetensors writes a file from a dict of arrays), about 4.3 GB for
the release's shards. The export goes to ``HF_DIR.partial`` and is renamed to HF_DIR when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from convert import orbax_layout
from convert.checkpoint import check_checkpoint_dir, load_config
from convert.converter import PARTIAL_SUFFIX
from convert.hf_layout import hf_name_grid, mtp_copy_names
from convert.plan import SCALE_SUFFIX, plan_conversion
from convert.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, TensorHeader
from dsv32_jax.params import flatten_specs, model_specs


@dataclasses.dataclass(frozen=True)
class ExportResult:
  path: Path
  files: int
  tensors: int
  bytes: int
  seconds: float


def _headers(ckpt: Path, cfg, weight_map: dict[str, str]) -> dict[str, TensorHeader]:
  """What the source's headers were, rebuilt from the checkpoint's arrays and recorded tensor map."""
  stored = orbax_layout.stored_leaves(ckpt / orbax_layout.PARAMS_DIR)
  headers: dict[str, TensorHeader] = {}

  def add(name: str, shape, dtype) -> None:
    if name not in weight_map:
      raise CheckpointError(f"{ckpt / orbax_layout.SOURCE_INDEX_FILE}: no shard recorded for tensor '{name}'")
    headers[name] = TensorHeader(name, weight_map[name], tuple(shape), dtype)

  for path, _ in flatten_specs(model_specs(cfg)):
    if path not in stored:
      raise CheckpointError(f"{ckpt}: array {'.'.join(path)} is missing")
    grid = hf_name_grid(cfg, path)
    shape, dtype = stored[path]
    for name in grid.flat:
      add(name, shape[grid.ndim:], dtype)
    scale_path = path[:-1] + ("scale",)
    if path[-1] == "weight" and scale_path in stored:
      scale_shape, scale_dtype = stored[scale_path]
      for name in grid.flat:
        add(name + SCALE_SUFFIX, scale_shape[grid.ndim:], scale_dtype)
  for name, top in mtp_copy_names(cfg).items():
    if name in weight_map:
      add(name, *stored[(top,)])
  return headers


def export_checkpoint(ckpt_dir: str | Path, hf_dir: str | Path, progress: bool = True) -> ExportResult:
  t0 = time.perf_counter()
  ckpt = check_checkpoint_dir(ckpt_dir)
  final = Path(hf_dir).absolute()
  if final.exists():
    raise FileExistsError(f"{final}: already exists; choose a new directory for the export")
  record_path = ckpt / orbax_layout.SOURCE_INDEX_FILE
  if not record_path.exists():
    raise CheckpointError(f"{ckpt}: no {orbax_layout.SOURCE_INDEX_FILE} (converted by an older dsv32-jax); "
                          "convert it again to export it")
  record = json.loads(record_path.read_text())
  meta = json.loads((ckpt / orbax_layout.META_FILE).read_text())
  cfg = load_config(ckpt)
  headers = _headers(ckpt, cfg, record["weight_map"])
  plan = plan_conversion(cfg, headers, "fp8", source=str(ckpt))  # as stored: nothing to dequantise
  by_file: dict[str, list] = {}
  for job in plan.jobs:
    by_file.setdefault(job.source.file, []).append((job.source.name, job.leaf, job.index))
  for check in plan.copy_checks:
    by_file.setdefault(check.source.file, []).append((check.source.name, check.leaf, ()))
  partial = final.with_name(final.name + PARTIAL_SUFFIX)
  if partial.exists():
    shutil.rmtree(partial)
  partial.mkdir(parents=True)
  try:
    context = orbax_layout.ts_context()
    params_dir = ckpt / orbax_layout.PARAMS_DIR
    stores = {leaf.path: orbax_layout.open_for_read(params_dir, leaf.name, context) for leaf in plan.leaves}
    total = sum(h.nbytes for h in headers.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress,
              dynamic_ncols=True) as bar:
      for file in sorted(by_file):
        bar.set_postfix_str(file, refresh=False)
        reads = {name: stores[leaf][index].read() for name, leaf, index in by_file[file]}
        tensors = {name: np.ascontiguousarray(f.result()) for name, f in reads.items()}
        tmp = partial / (file + ".tmp")
        save_file(tensors, str(tmp), metadata=record["file_metadata"].get(file))
        os.replace(tmp, partial / file)
        bar.update(sum(t.nbytes for t in tensors.values()))
        del tensors, reads
    exported = {name for names in by_file.values() for name, _, _ in names}
    same_names = exported == set(record["weight_map"])
    if meta["weights"] == "fp8" and record.get("config_text") and cfg.n_mtp_layers == \
        int(json.loads(record["config_text"]).get("num_nextn_predict_layers", 0)):
      (partial / "config.json").write_text(record["config_text"])
    else:
      (partial / "config.json").write_text((ckpt / orbax_layout.CONFIG_FILE).read_text())
    if record.get("index_text") and same_names:
      (partial / INDEX_FILE).write_text(record["index_text"])
    elif not (len(by_file) == 1 and SINGLE_FILE in by_file and same_names):
      index = {"metadata": {"total_size": int(total)},
               "weight_map": {name: headers[name].file for name in sorted(exported)}}
      (partial / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    orbax_layout.fsync_tree(partial)
    partial.rename(final)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return ExportResult(final, len(by_file), len(exported), total, time.perf_counter() - t0)
