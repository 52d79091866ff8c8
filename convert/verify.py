"""``dsv32 verify HF_DIR CKPT_DIR``: every tensor of the source against what the checkpoint holds.

Reads the source as the converter does (same plan, source order, ``workers`` tensors at a time, bounded
memory) and each slice of the checkpoint with TensorStore. For a ``--weights fp8`` checkpoint every
e4m3 weight, float32 block scale and float tensor must be bit-identical to the source; for a
``--weights bf16`` checkpoint every dequantised weight must equal ``bfloat16(float32(W8) * scale)``
bit for bit. It also checks the array set, shapes and dtypes (Orbax's metadata), the config, the MTP
layer's copies of the embedding and head, and each shard's sha256 against the one recorded at
conversion. Problems are collected, not raised: the report lists them all.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert import orbax_layout
from convert.checkpoint import check_checkpoint_dir, load_config
from convert.converter import DEFAULT_WORKERS, MallocTrimmer, job_source_bytes, read_source, stream_jobs
from convert.plan import TensorJob, job_output
from convert.safetensors_io import ShardHandles, file_sha256


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  tensors: int            # source tensors compared
  bytes: int              # source bytes read
  problems: tuple[str, ...]
  seconds: float

  @property
  def ok(self) -> bool:
    return not self.problems


def _differs(expected: np.ndarray, actual: np.ndarray) -> str | None:
  if expected.shape != actual.shape or expected.dtype != actual.dtype:
    return f"expected {expected.dtype} {expected.shape}, found {actual.dtype} {actual.shape}"
  a, b = expected.view(np.uint8).reshape(-1), actual.view(np.uint8).reshape(-1)
  if np.array_equal(a, b):
    return None
  first = int(np.argmax(a != b)) // expected.dtype.itemsize
  where = np.unravel_index(first, expected.shape) if expected.shape else ()
  n = int(np.count_nonzero(expected.reshape(-1).view(f"u{expected.dtype.itemsize}") !=
                           actual.reshape(-1).view(f"u{expected.dtype.itemsize}")))
  return (f"{n} element(s) differ, first at {tuple(int(i) for i in where)}: "
          f"expected {expected[where]!r}, found {actual[where]!r}")


def verify_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, workers: int = DEFAULT_WORKERS,
                      progress: bool = True) -> VerifyReport:
  t0 = time.perf_counter()
  ckpt = check_checkpoint_dir(ckpt_dir)
  meta = json.loads((ckpt / orbax_layout.META_FILE).read_text())
  src = read_source(hf_dir, meta["weights"])
  plan = src.plan
  problems: list[str] = []

  cfg = load_config(ckpt)
  if cfg != plan.cfg:
    diff = [f"{f.name}: source {getattr(plan.cfg, f.name)}, checkpoint {getattr(cfg, f.name)}"
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(plan.cfg, f.name)]
    problems.append(f"config.json differs from the source's: {'; '.join(diff)}")
  params_dir = ckpt / orbax_layout.PARAMS_DIR
  stored = orbax_layout.stored_leaves(params_dir)
  expected = {leaf.path: (leaf.shape, leaf.dtype) for leaf in plan.leaves}
  for path in sorted(set(expected) | set(stored)):
    name = ".".join(path)
    if path not in stored:
      problems.append(f"array {name} is missing from the checkpoint")
    elif path not in expected:
      problems.append(f"array {name} is in the checkpoint but not in a model converted from this source")
    elif stored[path] != expected[path]:
      (s_shape, s_dtype), (e_shape, e_dtype) = stored[path], expected[path]
      problems.append(f"array {name} is {s_dtype} {s_shape}; the source converts to {e_dtype} {e_shape}")
  comparable = {path for path in expected if stored.get(path) == expected[path]}

  context = orbax_layout.ts_context()
  stores = {path: orbax_layout.open_for_read(params_dir, ".".join(path), context) for path in comparable}
  handles = ShardHandles(src.dir)
  source = str(src.dir)
  jobs = [j for j in plan.jobs if j.leaf in comparable]

  def run(job: TensorJob) -> tuple[TensorJob, str | None]:
    want = job_output(job, handles.get, source)
    got = stores[job.leaf][job.index].read().result()
    return job, _differs(want, got)

  recorded = meta.get("source", {}).get("shards", {})
  hash_pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
  hashes = {f: hash_pool.submit(file_sha256, src.dir / f) for f in src.index.files}
  checked = 0
  trimmer = MallocTrimmer()
  with tqdm(total=sum(job_source_bytes(j) for j in jobs), unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
            disable=not progress, dynamic_ncols=True) as bar:
    def done(result) -> None:
      nonlocal checked
      job, problem = result
      checked += 1
      if problem:
        index = f"[{', '.join(map(str, job.index))}]" if job.index else ""
        problems.append(f"{job.source.name} ({job.source.file}) != {'.'.join(job.leaf)}{index}: {problem}")
      bar.update(job_source_bytes(job))
      trimmer.processed(job_source_bytes(job))

    def start_file(file: str) -> None:
      handles.keep_only({file})
      bar.set_postfix_str(file, refresh=False)

    stream_jobs(jobs, run, workers, start_file, done)
  handles.keep_only(set())
  for check in plan.copy_checks:
    if check.leaf in comparable:
      problem = _differs(handles.get(check.source), stores[check.leaf].read().result())
      if problem:
        problems.append(f"{check.source.name} ({check.source.file}) != {check.leaf[0]}: {problem}")
  handles.close()
  for file, future in hashes.items():
    digest = future.result()
    want = recorded.get(file, {}).get("sha256")
    if want != digest:
      problems.append(f"{src.dir / file}: sha256 {digest} differs from the {want} recorded at conversion "
                      "(the source changed since)")
  for file in sorted(set(recorded) - set(hashes)):
    problems.append(f"{file}: converted from, but no longer in {src.dir}")
  hash_pool.shutdown()
  return VerifyReport(checked, sum(job_source_bytes(j) for j in jobs), tuple(problems), time.perf_counter() - t0)
