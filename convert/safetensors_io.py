"""Reading and writing sharded safetensors checkpoints (the HF release layout) with `safetensors`.

safetensors' numpy binding builds arrays through ``getattr(numpy, dtype_name)``, and numpy itself has
no ``bfloat16`` or ``float8_e4m3fn``: we register ml_dtypes' types under those names once, so that
``safe_open(..., framework="numpy")`` returns the release's bf16 and e4m3 tensors as they are stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

for _name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
  if not hasattr(np, _name):
    setattr(np, _name, getattr(ml_dtypes, _name))

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A source checkpoint that cannot be read as the release format; the message names file and tensor."""


class ShardedReader:
  """Lazy access to the tensors of a HF checkpoint directory, by name."""

  def __init__(self, hf_dir: str | Path):
    self.dir = Path(hf_dir)
    index = self.dir / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    elif (self.dir / SINGLE_FILE).exists():
      with self._open(SINGLE_FILE) as f:
        weight_map = {k: SINGLE_FILE for k in f.keys()}
    else:
      raise CheckpointError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    self.weight_map: dict[str, str] = dict(weight_map)
    self._handles: dict[str, object] = {}

  def _open(self, file: str):
    path = self.dir / file
    if not path.exists():
      raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
    try:
      return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

  def _handle(self, file: str):
    if file not in self._handles:
      self._handles[file] = self._open(file)
    return self._handles[file]

  def names(self) -> list[str]:
    return list(self.weight_map)

  def __contains__(self, name: str) -> bool:
    return name in self.weight_map

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise CheckpointError(f"{self.dir}: tensor '{name}' is not in the checkpoint")
    file = self.weight_map[name]
    try:
      return self._handle(file).get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{self.dir / file}: cannot read tensor '{name}' ({e})") from None

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
    sl = self._handle(self.weight_map[name]).get_slice(name)
    return tuple(sl.get_shape()), sl.get_dtype()


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> list[Path]:
  """Writes (name, array) pairs into model-XXXXX-of-YYYYY.safetensors shards plus the index json.

  Streams: at most one shard's tensors are held at a time; files get their final names once the
  shard count is known.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  pending: dict[str, np.ndarray] = {}
  pending_bytes = 0
  written: list[tuple[Path, list[str]]] = []
  total = 0

  def flush():
    nonlocal pending, pending_bytes
    tmp = out / f"shard-{len(written):05d}.safetensors.tmp"
    save_file(pending, str(tmp), metadata={"format": "pt", **(metadata or {})})
    written.append((tmp, list(pending)))
    pending, pending_bytes = {}, 0

  for name, array in tensors:
    if pending and pending_bytes + array.nbytes > shard_bytes:
      flush()
    pending[name] = np.ascontiguousarray(array)
    pending_bytes += array.nbytes
    total += array.nbytes
  if pending or not written:
    flush()
  weight_map, paths = {}, []
  for i, (tmp, names) in enumerate(written):
    file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
    os.replace(tmp, out / file)
    weight_map.update({k: file for k in names})
    paths.append(out / file)
  index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
  (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
  return paths


def iter_tensors(reader: ShardedReader, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
  for name in names:
    yield name, reader.get(name)
