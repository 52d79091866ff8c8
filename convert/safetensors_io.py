"""Reading and writing sharded safetensors checkpoints (the HF release layout) with `safetensors`.

safetensors' numpy binding builds arrays through ``getattr(numpy, dtype_name)``, and numpy itself has
no ``bfloat16`` or ``float8_e4m3fn``: we register ml_dtypes' types under those names once, so that
``safe_open(..., framework="numpy")`` returns the release's bf16 and e4m3 tensors as they are stored.

Two ways in:

* ``ShardedReader``: random access by name, handles kept open (small checkpoints, tests).
* ``read_source_index`` + ``read_headers`` + ``ShardHandles``: what the streaming converter uses. The
  headers give every tensor's shape and dtype without reading data. ``safe_open`` memory-maps a whole
  shard, and every page a read touches stays in the process's RSS until the mapping closes, so
  ``ShardHandles`` reopens a shard after every ``recycle_bytes`` read through it and drops a shard's
  handle when the converter moves on: file-backed RSS stays below ``recycle_bytes`` + one tensor
  instead of growing to the whole model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

for _name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
  if not hasattr(np, _name):
    setattr(np, _name, getattr(ml_dtypes, _name))

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

RECYCLE_BYTES = 64 << 20  # ShardHandles reopens a shard after this many bytes read through one handle

# safetensors' dtype names -> numpy dtypes (the ones a DeepSeek checkpoint can hold)
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
}


class CheckpointError(ValueError):
  """A source checkpoint that cannot be read as the release format; the message names file and tensor."""


class ShardedReader:
  """Random access to the tensors of a HF checkpoint directory, by name (handles stay open)."""

  def __init__(self, hf_dir: str | Path):
    self.index = read_source_index(hf_dir)
    self.dir = self.index.dir
    self.weight_map: dict[str, str] = dict(self.index.weight_map)
    self._handles: dict[str, object] = {}

  def _handle(self, file: str):
    if file not in self._handles:
      self._handles[file] = open_shard(self.dir, file)
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


# -- streaming access (the converter) ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceIndex:
  """Which file holds which tensor: ``model.safetensors.index.json``, or the one ``model.safetensors``."""

  dir: Path
  weight_map: Mapping[str, str]       # tensor name -> file name
  files: tuple[str, ...]              # sorted
  index_json: dict | None             # the index file as read (None for a single model.safetensors)


@dataclasses.dataclass(frozen=True)
class TensorHeader:
  """A tensor as a safetensors header describes it (no data read)."""

  name: str
  file: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_source_index(hf_dir: str | Path) -> SourceIndex:
  hf_dir = Path(hf_dir)
  index = hf_dir / INDEX_FILE
  if index.exists():
    try:
      index_json = json.loads(index.read_text())
      weight_map = dict(index_json["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
  elif (hf_dir / SINGLE_FILE).exists():
    index_json = None
    with open_shard(hf_dir, SINGLE_FILE) as f:
      weight_map = {k: SINGLE_FILE for k in f.keys()}
  else:
    raise CheckpointError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
  for name, file in weight_map.items():
    if not isinstance(file, str) or "/" in file or file in ("", ".", ".."):
      raise CheckpointError(f"{index}: tensor '{name}' maps to {file!r}, expected a file name in {hf_dir}")
  return SourceIndex(hf_dir, weight_map, tuple(sorted(set(weight_map.values()))), index_json)


def open_shard(hf_dir: Path, file: str):
  path = Path(hf_dir) / file
  if not path.exists():
    raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
  try:
    return safe_open(str(path), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def read_headers(index: SourceIndex) -> tuple[dict[str, TensorHeader], dict[str, dict[str, str] | None]]:
  """Every tensor's header, checked against the index; and each shard's ``__metadata__``.

  Opens each shard once (safetensors checks that the header covers the file exactly, so a truncated or
  extended shard fails here) and reads no tensor data.
  """
  headers: dict[str, TensorHeader] = {}
  file_metadata: dict[str, dict[str, str] | None] = {}
  listed: dict[str, set[str]] = {}
  for name, file in index.weight_map.items():
    listed.setdefault(file, set()).add(name)
  for file in index.files:
    path = index.dir / file
    with open_shard(index.dir, file) as f:
      names = set(f.keys())
      file_metadata[file] = f.metadata()
      missing = sorted(listed[file] - names)
      if missing:
        raise CheckpointError(f"{path}: tensor '{missing[0]}' is listed in {INDEX_FILE} under this file but not in it"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
      extra = sorted(names - listed[file])
      if extra:
        raise CheckpointError(f"{path}: holds tensor '{extra[0]}' that {INDEX_FILE} does not list under this file"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
      for name in sorted(names):
        sl = f.get_slice(name)
        dtype = sl.get_dtype()
        if dtype not in SAFETENSORS_DTYPES:
          raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}, which a DeepSeek checkpoint never holds")
        headers[name] = TensorHeader(name, file, tuple(int(d) for d in sl.get_shape()), SAFETENSORS_DTYPES[dtype])
  return headers, file_metadata


class ShardHandles:
  """Shared ``safe_open`` handles for worker threads, with bounded file-backed memory.

  A handle is reopened after ``recycle_bytes`` have been read through it; a replaced or released
  handle is unmapped as soon as the reads that hold it finish. ``keep_only(files)`` drops the handles
  of shards the reader has moved past.
  """

  def __init__(self, hf_dir: str | Path, recycle_bytes: int = RECYCLE_BYTES):
    self.dir = Path(hf_dir)
    self.recycle_bytes = recycle_bytes
    self._lock = threading.Lock()
    self._handles: dict[str, list] = {}  # file -> [handle, bytes read through it]

  def _handle(self, file: str, nbytes: int):
    with self._lock:
      entry = self._handles.get(file)
      if entry is None or entry[1] >= self.recycle_bytes:
        entry = self._handles[file] = [open_shard(self.dir, file), 0]
      entry[1] += nbytes
      return entry[0]

  def get(self, header: TensorHeader) -> np.ndarray:
    handle = self._handle(header.file, header.nbytes)
    try:
      return handle.get_tensor(header.name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{self.dir / header.file}: cannot read tensor '{header.name}' ({e})") from None

  def get_rows(self, header: TensorHeader, start: int, stop: int) -> np.ndarray:
    handle = self._handle(header.file, header.nbytes * (stop - start) // max(1, header.shape[0]))
    try:
      return handle.get_slice(header.name)[start:stop]
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{self.dir / header.file}: cannot read tensor '{header.name}' ({e})") from None

  def keep_only(self, files: set[str]) -> None:
    with self._lock:
      for file in [f for f in self._handles if f not in files]:
        del self._handles[file]

  def close(self) -> None:
    with self._lock:
      self._handles.clear()


def file_sha256(path: str | Path, window_bytes: int = 16 << 20) -> str:
  """Hex sha256 of a file (what the Hugging Face hub lists for LFS files). Hashes memory-mapped windows
  of the file (no copy out of the page cache), unmapping each before the next."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    for offset in range(0, size, window_bytes):
      with mmap.mmap(f.fileno(), min(window_bytes, size - offset), offset=offset, access=mmap.ACCESS_READ) as m:
        h.update(m)
  return h.hexdigest()
