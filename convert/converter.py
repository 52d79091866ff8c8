"""``dsv32 convert``: a Hugging Face DeepSeek-V3.2 checkpoint (the FP8 release, ~690 GB) -> our Orbax
checkpoint, streamed tensor by tensor, in bounded memory, resumable, finalised atomically.

1. **Plan** from the safetensors headers alone (``plan.plan_conversion``): every missing, unknown,
   misshapen or mistyped tensor is reported, naming file and tensor, before anything is written.
2. **Partial directory** ``CKPT_DIR.partial/`` beside the target: a lock, ``plan.json`` (what is being
   converted: weight mode, config, arrays, and each shard's size and mtime), ``done.log`` (one line per
   tensor whose slice is committed) and ``hashes.jsonl`` (sha256 per shard). Nothing is ever written at
   CKPT_DIR itself until the end.
3. **Stream** the jobs in source order, ``workers`` at a time: read the tensor (``ShardHandles``),
   check it, keep it or dequantise it, write it into its slice of the output array (``orbax_layout``).
   Jobs are committed in groups of ~16 MiB (one TensorStore transaction each, committed as soon as its
   last job is written, while the next jobs run); once a group's commit is durable its names go to
   ``done.log``. A background thread
   hashes each shard while its tensors are converted.
4. **Check** the MTP layer's copies of the embedding and head against the main ones (row blocks).
5. **Finalise**: Orbax's metadata files, ``config.json``, ``source_index.json``, ``dsv32_meta.json``
   (written last), fsync, then one ``rename`` of the partial directory to CKPT_DIR. A checkpoint
   without ``dsv32_meta.json`` or Orbax's ``_METADATA`` does not load, so no interrupted run can leave
   one that does.

``--resume`` reopens the arrays, skips every tensor in ``done.log`` and converts the rest; tensors of a
shard whose size or mtime changed since (a re-download) are redone. Slice writes are idempotent, so a
tensor that was written but not yet logged when the process died is simply written again.

**Memory.** Nothing is held beyond the open commit groups (at most ``workers`` + 2 of them: those with
a job running, the one being filled, one being committed; each 16 MiB + one slice) and the ``workers``
jobs running (one source tensor and its output
slice each, plus a float32 block row for ``--weights bf16``); mapped source pages are bounded by
``ShardHandles``' recycling, the OCDBT node cache by ``orbax_layout.ts_context``, and freed buffers
are handed back to the OS every 64 MiB (``MallocTrimmer``). Peak RSS is therefore
a constant plus a small multiple of the largest slice, independent of the number of tensors, layers or
experts; the README states the measured bound (``tests/test_convert_memory.py`` checks it).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import gc
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from convert import orbax_layout
from convert.plan import ConversionPlan, TensorJob, job_output, plan_conversion
from convert.safetensors_io import (INDEX_FILE, CheckpointError, ShardHandles, SourceIndex, file_sha256, read_headers,
                                    read_source_index)
from dsv32_jax.config import ModelConfig

T = TypeVar("T")
PARTIAL_SUFFIX = ".partial"
LOCK_FILE = ".lock"
PLAN_FILE = "plan.json"
DONE_FILE = "done.log"
HASHES_FILE = "hashes.jsonl"
COPY_CHECK_BLOCK_BYTES = 8 << 20
GROUP_BYTES = 16 << 20      # a commit group: tensors written in one TensorStore transaction
GROUP_TENSORS = 256
DEFAULT_WORKERS = 4
TRIM_EVERY_BYTES = 64 << 20


class MallocTrimmer:
  """Calls glibc's ``malloc_trim`` every `every_bytes` of tensors processed (a no-op without glibc).

  Tensor-sized buffers allocated and freed by several threads stay in glibc's per-thread arenas after
  ``free`` (above its adaptive mmap threshold they would be unmapped, but that threshold rises to
  32 MiB as soon as one such block is freed). Converting 3.4 GB, RSS then rose by ~200 MiB and was still
  rising; trimming every 64 MiB roughly halves that, and it levels off. (Pinning the threshold with ``mallopt``
  did as well, but made every buffer fresh zeroed pages: ~30% more system time.)
  """

  def __init__(self, every_bytes: int = TRIM_EVERY_BYTES):
    self.every_bytes, self.pending = every_bytes, 0
    try:
      self.trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
      self.trim = None

  def processed(self, nbytes: int) -> None:
    self.pending += nbytes
    if self.pending >= self.every_bytes and self.trim is not None:
      self.pending = 0
      self.trim(0)


@contextlib.contextmanager
def _no_cyclic_gc():
  """Python's cycle collector off while streaming: the loop makes no cycles, and each collection
  rescanned every object of the process (4% of the conversion's CPU)."""
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


def converter_version() -> str:
  try:
    from importlib.metadata import version
    package = version("dsv32-jax")
  except Exception:  # running from a source tree that is not installed
    package = "source"
  return f"dsv32-jax {package}, checkpoint format {orbax_layout.FORMAT_VERSION}"


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  path: Path
  tensors: int          # source tensors converted in this run
  skipped: int          # tensors already done by an interrupted run (--resume)
  bytes_read: int       # source bytes converted in this run
  seconds: float

  @property
  def gb_per_s(self) -> float:
    return self.bytes_read / max(self.seconds, 1e-9) / 1e9


@dataclasses.dataclass(frozen=True)
class SourceCheckpoint:
  """A source directory, read up to its plan (headers only)."""

  index: SourceIndex
  hf_config: dict
  config_text: str                            # config.json as it is (export writes it back)
  index_text: str | None                      # model.safetensors.index.json as it is, if there is one
  file_metadata: dict[str, dict[str, str] | None]
  plan: ConversionPlan

  @property
  def dir(self) -> Path:
    return self.index.dir


def read_source(hf_dir: str | Path, weights: str = "fp8") -> SourceCheckpoint:
  hf_dir = Path(hf_dir)
  index = read_source_index(hf_dir)
  config_path = hf_dir / "config.json"
  try:
    config_text = config_path.read_text()
    hf_config = json.loads(config_text)
  except FileNotFoundError:
    raise CheckpointError(f"{config_path}: missing (the model's config.json is needed beside the weights)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
  cfg = ModelConfig.from_hf_dict(hf_config, source=str(config_path))
  headers, file_metadata = read_headers(index)
  plan = plan_conversion(cfg, headers, weights, source=str(hf_dir))
  index_text = (hf_dir / INDEX_FILE).read_text() if index.index_json is not None else None
  return SourceCheckpoint(index, hf_config, config_text, index_text, file_metadata, plan)


def partial_dir_for(ckpt_dir: Path) -> Path:
  return ckpt_dir.with_name(ckpt_dir.name + PARTIAL_SUFFIX)


def _shard_identity(src: SourceCheckpoint) -> dict[str, list[int]]:
  out = {}
  for file in src.index.files:
    st = (src.dir / file).stat()
    out[file] = [st.st_size, st.st_mtime_ns]
  return out


def _plan_record(src: SourceCheckpoint) -> dict:
  return {
      "converter": converter_version(),
      "weights": src.plan.weights,
      "config": src.hf_config,
      "arrays": [[leaf.name, list(leaf.shape), str(leaf.dtype)] for leaf in src.plan.leaves],
  }


def _read_lines(path: Path) -> list[str]:
  """Complete lines of a log (a line cut short by a kill has no newline and is dropped)."""
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.split("\n")
  return [line for line in lines[:-1] if line]  # the last element is '' or an incomplete line


class _Journal:
  """The partial directory's bookkeeping: what is planned, what is done, which shards are hashed."""

  def __init__(self, partial: Path, src: SourceCheckpoint, resume: bool):
    self.dir = partial
    identity = _shard_identity(src)
    record = _plan_record(src)
    self.done: set[str] = set()
    self.hashes: dict[str, str] = {}
    self.redone_files: list[str] = []
    if resume:
      try:
        old = json.loads((partial / PLAN_FILE).read_text())
      except (FileNotFoundError, json.JSONDecodeError):
        raise CheckpointError(f"{partial}: not a resumable conversion (no readable {PLAN_FILE}); delete it and "
                              "convert again") from None
      for key in ("weights", "config", "arrays"):
        if old.get(key) != record[key]:
          raise CheckpointError(f"{partial}: was started with a different {key} than this run "
                                f"(e.g. --weights {old.get('weights')}); delete it, or resume with the same source "
                                "and flags")
      changed = {f for f in identity if old.get("shards", {}).get(f) != identity[f]}
      self.redone_files = sorted(changed)
      self.done = {n for n in _read_lines(partial / DONE_FILE)
                   if n in src.index.weight_map and src.index.weight_map[n] not in changed}
      for line in _read_lines(partial / HASHES_FILE):
        entry = json.loads(line)
        if entry["file"] not in changed and identity.get(entry["file"]) == [entry["bytes"], entry["mtime_ns"]]:
          self.hashes[entry["file"]] = entry["sha256"]
    self.identity = identity
    (partial / PLAN_FILE).write_text(json.dumps({**record, "shards": identity}))
    # rewrite the logs without entries of changed shards, then append
    (partial / DONE_FILE).write_text("".join(n + "\n" for n in sorted(self.done)))
    (partial / HASHES_FILE).write_text("".join(
        json.dumps({"file": f, "sha256": h, "bytes": identity[f][0], "mtime_ns": identity[f][1]}) + "\n"
        for f, h in sorted(self.hashes.items())))
    self._done_fd = os.open(partial / DONE_FILE, os.O_WRONLY | os.O_APPEND)
    self._hash_fd = os.open(partial / HASHES_FILE, os.O_WRONLY | os.O_APPEND)

  def mark_done(self, names: list[str]) -> None:
    os.write(self._done_fd, "".join(n + "\n" for n in names).encode())
    self.done.update(names)

  def mark_hashed(self, file: str, sha256: str) -> None:
    size, mtime = self.identity[file]
    os.write(self._hash_fd, (json.dumps({"file": file, "sha256": sha256, "bytes": size, "mtime_ns": mtime}) + "\n")
             .encode())
    self.hashes[file] = sha256

  def close(self) -> None:
    for fd in (self._done_fd, self._hash_fd):
      try:
        os.close(fd)
      except OSError:
        pass


def _lock(partial: Path):
  fd = os.open(partial / LOCK_FILE, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise CheckpointError(f"{partial}: another `dsv32 convert` is writing here") from None
  return fd


def _check_disk_space(partial: Path, src: SourceCheckpoint, done: set[str]) -> None:
  out_bytes = sum(leaf.nbytes for leaf in src.plan.leaves)
  written = sum(j.source.nbytes for j in src.plan.jobs if j.source.name in done)
  need = max(0, out_bytes - written)
  free = shutil.disk_usage(partial).free
  if need > free:
    raise CheckpointError(f"{partial}: the checkpoint needs about {need / 1e9:.1f} GB more, and only "
                          f"{free / 1e9:.1f} GB are free on that file system")


def job_source_bytes(job: TensorJob) -> int:
  return job.source.nbytes + (job.dequant_scale.nbytes if job.dequant_scale else 0)


def _check_copies(src: SourceCheckpoint, handles: ShardHandles) -> None:
  """The MTP layer's embedding and head must equal the main model's (which we keep once). Compared in
  the source, row block by row block (the main tensor was written bit for bit; verify checks that)."""
  originals = {job.leaf: job.source for job in src.plan.jobs if job.index == ()}
  for check in src.plan.copy_checks:
    h, original = check.source, originals[check.leaf]
    rows = max(1, COPY_CHECK_BLOCK_BYTES // max(1, h.nbytes // h.shape[0]))
    for r0 in range(0, h.shape[0], rows):
      r1 = min(h.shape[0], r0 + rows)
      if not np.array_equal(handles.get_rows(h, r0, r1).view(np.uint8),
                            handles.get_rows(original, r0, r1).view(np.uint8)):
        raise CheckpointError(f"{src.dir}/{h.file}: '{h.name}' differs from the main model's {check.leaf[0]} "
                              f"'{original.name}' ({original.file}), rows {r0}..{r1}; the MTP module is expected "
                              "to share them")


def _write_final_files(partial: Path, src: SourceCheckpoint, hashes: dict[str, str], init_ns: int) -> None:
  plan = src.plan
  orbax_layout.write_orbax_metadata(partial / orbax_layout.PARAMS_DIR, plan.leaves, init_ns)
  config = dict(src.hf_config)
  if plan.dropped_mtp:
    config["num_nextn_predict_layers"] = 0
  if plan.weights == "bf16":
    config.pop("quantization_config", None)
    config["torch_dtype"] = "bfloat16"
  (partial / orbax_layout.CONFIG_FILE).write_text(json.dumps(config, indent=2))
  (partial / orbax_layout.SOURCE_INDEX_FILE).write_text(json.dumps({
      "index_text": src.index_text,
      "config_text": src.config_text,
      "weight_map": dict(src.index.weight_map),
      "file_metadata": src.file_metadata,
  }))
  meta = {
      "format_version": orbax_layout.FORMAT_VERSION,
      "converter": converter_version(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "weights": plan.weights,
      "source": {
          "dir": str(src.dir.absolute()),
          "config": src.hf_config,
          "shards": {f: {"sha256": hashes[f], "bytes": (src.dir / f).stat().st_size} for f in src.index.files},
      },
      "tensors": len(plan.jobs) + len(plan.copy_checks),
      "arrays": {leaf.name: {"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for leaf in plan.leaves},
  }
  if plan.dropped_mtp:
    meta["note"] = "the source has no MTP layer tensors (transformers drops them): converted without MTP"
  (partial / orbax_layout.META_FILE).write_text(json.dumps(meta, indent=2))


def stream_jobs(jobs: list[TensorJob], run: Callable[[TensorJob], T], workers: int,
                on_start_file: Callable[[str], None], on_done: Callable[[T], None]) -> None:
  """Runs the jobs in order, at most `workers` at a time; `on_done` in the calling thread, as each
  finishes. On an error or an interrupt, the writes already running are finished (and reported) first."""
  with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
    in_flight: set[Future] = set()

    def finish(futures) -> None:
      for f in futures:
        in_flight.discard(f)
        on_done(f.result())  # raises the worker's error

    try:
      current_file = None
      for job in jobs:
        if job.source.file != current_file:
          current_file = job.source.file
          on_start_file(current_file)
        while len(in_flight) >= workers:
          finish(wait(in_flight, return_when=FIRST_COMPLETED)[0])
        in_flight.add(pool.submit(run, job))
      while in_flight:
        finish(wait(in_flight, return_when=FIRST_COMPLETED)[0])
    except BaseException:
      for f in list(in_flight):
        f.cancel()
      for f in list(in_flight):
        try:
          finish([f])
        except BaseException:
          pass
      raise


def commit_groups(jobs: list[TensorJob], max_bytes: int = GROUP_BYTES,
                  max_tensors: int = GROUP_TENSORS) -> list[list[TensorJob]]:
  """Consecutive jobs, cut when a group reaches `max_bytes` of output or `max_tensors` tensors."""
  groups: list[list[TensorJob]] = []
  size = 0
  for job in jobs:
    if not groups or size >= max_bytes or len(groups[-1]) >= max_tensors:
      groups.append([])
      size = 0
    groups[-1].append(job)
    size += job.source.nbytes * (2 if job.dequant_scale is not None else 1)  # the output slice's bytes
  return groups


@dataclasses.dataclass
class _OpenGroup:
  jobs: list[TensorJob]
  txn: ts.Transaction
  running: int = 0        # jobs submitted and not finished
  closed: bool = False    # every job submitted


def _write_in_groups(groups: list[list[TensorJob]], write: Callable[[TensorJob, ts.Transaction], None], workers: int,
                     on_start_file: Callable[[str], None],
                     on_committed: Callable[[list[TensorJob]], None]) -> None:
  """Writes the jobs in order, `workers` at a time, each group in one TensorStore transaction that is
  committed as soon as its last job is written (while later jobs keep running); `on_committed(group)`
  runs in this thread once a group's commit has resolved.

  Every OCDBT commit writes a data file, the B-tree nodes it touches and the manifest: 41k tensors
  committed one by one took 316 s (with Orbax's one-node B-tree; 89 s with 1 MiB nodes), in groups of
  64, 7 s. A transaction holds its writes until committed; open groups are those with a
  job running (at most `workers`) and the one being filled, plus one commit under way.
  On an error or an interrupt the running jobs finish, the groups not yet committed are dropped
  (``--resume`` redoes them), and the commits under way complete and are reported.
  """
  opened: dict[int, _OpenGroup] = {}
  committing: list[tuple[ts.Future, list[TensorJob]]] = []

  def settle(keep: int) -> None:
    while len(committing) > keep:
      future, jobs = committing.pop(0)
      future.result()
      on_committed(jobs)

  def commit_if_done(gi: int) -> None:
    g = opened[gi]
    if g.closed and g.running == 0:
      del opened[gi]
      committing.append((g.txn.commit_async(), g.jobs))
      settle(keep=1)

  with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
    in_flight: dict[Future, int] = {}

    def finish(futures) -> None:
      for f in futures:
        gi = in_flight.pop(f)
        f.result()  # raises the worker's error
        opened[gi].running -= 1
        commit_if_done(gi)

    try:
      current_file = None
      for gi, jobs in enumerate(groups):
        opened[gi] = _OpenGroup(jobs, ts.Transaction())
        for job in jobs:
          if job.source.file != current_file:
            current_file = job.source.file
            on_start_file(current_file)
          while len(in_flight) >= workers:
            finish(wait(in_flight, return_when=FIRST_COMPLETED)[0])
          opened[gi].running += 1
          in_flight[pool.submit(write, job, opened[gi].txn)] = gi
        opened[gi].closed = True
        commit_if_done(gi)
      while in_flight:
        finish(wait(in_flight, return_when=FIRST_COMPLETED)[0])
      settle(keep=0)
    except BaseException:
      for f in in_flight:
        f.cancel()
      wait(in_flight)
      for g in opened.values():
        g.txn.abort()
      try:
        settle(keep=0)
      except BaseException:
        pass
      raise


def convert_hf_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, weights: str = "fp8", workers: int = DEFAULT_WORKERS,
                          resume: bool = False, progress: bool = True,
                          on_tensor_done: Callable[[str], None] | None = None) -> ConversionResult:
  """HF release (FP8) or save_pretrained (float) safetensors -> Orbax checkpoint at ckpt_dir.

  Raises CheckpointError / ConfigError (bad source: nothing written), FileExistsError (ckpt_dir exists,
  or an interrupted conversion is there and `resume` is False). An interrupted or failed run leaves
  ``ckpt_dir.partial``; ``resume=True`` continues it (and starts afresh when there is none).
  `on_tensor_done(name)` is called after each tensor's slice is committed and logged (a group at a time).
  """
  t_start = time.perf_counter()
  init_ns = time.time_ns()
  if workers < 1:
    raise ValueError(f"--workers {workers}: expected at least 1")
  final = Path(ckpt_dir).absolute()
  if final.exists():
    raise FileExistsError(f"{final}: already exists; remove it or choose another directory")
  src = read_source(hf_dir, weights)
  partial = partial_dir_for(final)
  if partial.exists() and not resume:
    raise FileExistsError(f"{partial}: an interrupted conversion is there; continue it with --resume, or delete it")
  if not partial.exists():
    partial.mkdir(parents=True)
    resume = False
  lock_fd = _lock(partial)
  try:
    journal = _Journal(partial, src, resume)
  except BaseException:
    os.close(lock_fd)
    raise
  hasher = _Hasher(src, journal)
  try:
    _check_disk_space(partial, src, journal.done)
    stores = orbax_layout.open_for_write(partial / orbax_layout.PARAMS_DIR, src.plan.leaves,
                                         orbax_layout.ts_context())
    todo = [j for j in src.plan.jobs if j.source.name not in journal.done]
    total = sum(job_source_bytes(j) for j in src.plan.jobs)
    handles = ShardHandles(src.dir)
    source = str(src.dir)

    def write(job: TensorJob, txn: ts.Transaction) -> None:
      array = job_output(job, handles.get, source)
      stores[job.leaf].with_transaction(txn)[job.index].write(
          array, can_reference_source_data_indefinitely=True).result()

    with tqdm(total=total, initial=total - sum(job_source_bytes(j) for j in todo), unit="B", unit_scale=True,
              unit_divisor=1024, smoothing=0.05, desc="convert", disable=not progress, dynamic_ncols=True) as bar:
      def start_file(file: str) -> None:
        handles.keep_only({file})  # reads of earlier shards still running hold their own handles
        hasher.start(file)
        bar.set_postfix_str(file, refresh=False)

      trimmer = MallocTrimmer()

      def committed(group: list[TensorJob]) -> None:
        journal.mark_done([job.source.name for job in group])
        nbytes = sum(job_source_bytes(job) for job in group)
        bar.update(nbytes)
        trimmer.processed(nbytes)
        if on_tensor_done:
          for job in group:
            on_tensor_done(job.source.name)

      with _no_cyclic_gc():
        _write_in_groups(commit_groups(todo), write, workers, start_file, committed)
    handles.keep_only(set())
    file_hashes = hasher.finish(progress)
    _check_copies(src, handles)
    handles.close()
    del stores
    _write_final_files(partial, src, file_hashes, init_ns)
  except CheckpointError as e:
    raise CheckpointError(f"{e}\n(what was converted is kept in {partial}: fix the source and rerun with --resume "
                          "to convert only what is missing, or delete it)") from None
  finally:
    hasher.close()
    journal.close()
    os.close(lock_fd)
  for name in (PLAN_FILE, DONE_FILE, HASHES_FILE, LOCK_FILE):
    (partial / name).unlink()
  orbax_layout.fsync_tree(partial)
  if final.exists():
    raise FileExistsError(f"{final}: appeared during the conversion; the converted checkpoint is left at {partial}")
  partial.rename(final)
  orbax_layout.fsync_dir(final.parent)
  return ConversionResult(final, len(todo), len(src.plan.jobs) - len(todo), sum(job_source_bytes(j) for j in todo),
                          time.perf_counter() - t_start)


class _Hasher:
  """sha256 of every shard on background threads (one per two cores, at most 4), started when the
  converter reaches the shard, so that they read pages it has just brought into the page cache; the
  converter waits when they fall more than one shard per thread behind."""

  def __init__(self, src: SourceCheckpoint, journal: _Journal):
    self.src, self.journal = src, journal
    self.threads = max(1, min(4, (os.cpu_count() or 2) // 2))
    self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sha256")
    self.futures: dict[str, Future] = {}

  def start(self, file: str) -> None:
    if file in self.journal.hashes or file in self.futures:
      return
    pending = [f for f in self.futures.values() if not f.done()]
    if len(pending) > self.threads:
      pending[0].result()
    self.futures[file] = self.pool.submit(self._hash, file)

  def _hash(self, file: str) -> str:
    digest = file_sha256(self.src.dir / file)
    self.journal.mark_hashed(file, digest)
    return digest

  def finish(self, progress: bool) -> dict[str, str]:
    for file in self.src.index.files:
      self.start(file)
    pending = [f for f in self.futures.values() if not f.done()]
    with tqdm(total=len(pending), desc="sha256 of the shards", unit="shard", disable=not progress or not pending) as bar:
      for f in pending:
        f.result()
        bar.update(1)
    for f in self.futures.values():
      f.result()
    return dict(self.journal.hashes)

  def close(self) -> None:
    self.pool.shutdown(wait=True, cancel_futures=True)
