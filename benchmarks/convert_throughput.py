"""Converter throughput and peak memory on a synthetic release-format checkpoint (CPU, this machine).

  PYTHONPATH=. python benchmarks/convert_throughput.py --workdir /tmp/convbench [--experts 64] \
      [--workers 4] [--weights fp8] [--cache warm|cold|both] [--out result.json]

A checkpoint of the 671B's structure at a smaller scale (FP8 + 128x128 scales, bf16 embedding and head,
MTP layer with its copies, 256 MB shards), written from random bytes by
``convert.init_random.write_synthetic_checkpoint``; its size is ~0.4 GB + 24 MB per routed expert.
Each step runs in a fresh subprocess, so that each peak RSS (``ru_maxrss``, which counts mapped file
pages too) is its own:

  read     the raw safetensors read speed of the same files: every tensor through
           ``safe_open(...).get_tensor``, shard after shard, one thread (what any loader must do)
  copy     the I/O floor of any converter: the shards' bytes read and written (8 MiB blocks) to the
           output's file system, fsynced
  convert  ``convert_hf_checkpoint``, end to end: headers, plan, streaming, sha256 of every shard,
           Orbax metadata, fsync of the output, rename

``cold``: before each step the source shards are fsynced and dropped from the page cache
(``posix_fadvise(DONTNEED)``, file by file), so both steps read from the disk; ``warm``: the shards are
read once before, so both read from the page cache. Prints and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synthetic_config(experts: int):
  from dsv32_jax.config import preset
  return preset("tiny").replace(
      vocab_size=8192, dim=2048, inter_dim=8192, moe_inter_dim=1024, n_layers=4, n_dense_layers=1, n_mtp_layers=1,
      n_heads=16, n_routed_experts=experts, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
      n_limited_groups=4, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048, original_seq_len=4096,
      max_seq_len=163840)


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def shard_files(hf_dir: Path) -> list[Path]:
  return sorted(hf_dir.glob("*.safetensors"))


def drop_from_page_cache(files) -> None:
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def step_write(args) -> dict:
  from convert.init_random import write_synthetic_checkpoint
  t0 = time.perf_counter()
  write_synthetic_checkpoint(synthetic_config(args.experts), args.hf)
  return {"seconds": time.perf_counter() - t0}


def step_read(args) -> dict:
  from convert.safetensors_io import open_shard
  t0 = time.perf_counter()
  n = 0
  for f in shard_files(Path(args.hf)):
    with open_shard(f.parent, f.name) as handle:
      for name in handle.keys():
        n += handle.get_tensor(name).nbytes
  return {"seconds": time.perf_counter() - t0, "bytes": n}


def current_rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_peak_bytes() -> int:
  with open("/proc/self/status") as f:
    line = next(line for line in f if line.startswith("VmPeak:"))
  return int(line.split()[1]) * 1024


def step_copy(args) -> dict:
  """The I/O floor of any converter: every shard's bytes read and written through user space (8 MiB
  blocks) to the output's file system, then fsynced -- what a conversion must do at least."""
  out = Path(args.ckpt)
  out.mkdir(parents=True)
  buf = bytearray(8 << 20)
  t0 = time.perf_counter()
  n = 0
  for f in shard_files(Path(args.hf)):
    with open(f, "rb", buffering=0) as src, open(out / f.name, "wb", buffering=0) as dst:
      while k := src.readinto(buf):
        dst.write(memoryview(buf)[:k])
        n += k
      os.fsync(dst.fileno())
  return {"seconds": time.perf_counter() - t0, "bytes": n}


def step_convert(args) -> dict:
  from convert.converter import convert_hf_checkpoint, read_source
  plan = read_source(args.hf, args.weights).plan
  baseline = current_rss_bytes()  # everything imported, the plan made
  r = convert_hf_checkpoint(args.hf, args.ckpt, weights=args.weights, workers=args.workers, progress=False)
  return {"seconds": r.seconds, "bytes": r.bytes_read, "tensors": r.tensors, "baseline_rss_bytes": baseline,
          "vm_peak_bytes": vm_peak_bytes(),
          "largest_tensor_bytes": max(j.source.nbytes for j in plan.jobs),
          "largest_slice_bytes": plan.largest_slice_bytes,
          "output_bytes": sum(leaf.nbytes for leaf in plan.leaves)}


STEPS = {"write": step_write, "read": step_read, "copy": step_copy, "convert": step_convert}


def run_step(step: str, **kw) -> dict:
  """One step in a fresh interpreter; returns its JSON result (with its peak RSS)."""
  cmd = [sys.executable, __file__, "step", step] + [f"--{k}={v}" for k, v in kw.items()]
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise RuntimeError(f"step {step} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd")
  s = sub.add_parser("step")
  s.add_argument("name", choices=sorted(STEPS))
  s.add_argument("--hf", required=True)
  s.add_argument("--ckpt")
  s.add_argument("--experts", type=int, default=64)
  s.add_argument("--workers", type=int, default=4)
  s.add_argument("--weights", default="fp8")
  parser.add_argument("--workdir", default="/tmp/dsv32-convert-bench")
  parser.add_argument("--experts", type=int, default=64, help="routed experts per layer: ~24 MB each")
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--weights", choices=["fp8", "bf16"], default="fp8")
  parser.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
  parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (the best is reported)")
  parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
  parser.add_argument("--ckpt-parent", help="where to write the converted checkpoint (default: the workdir; "
                                             "/dev/shm takes the disk's write speed out of the measurement)")
  parser.add_argument("--out", help="also write the summary JSON here")
  args = parser.parse_args(argv)
  if args.cmd == "step":
    result = STEPS[args.name](args)
    print(json.dumps({**result, "peak_rss_bytes": peak_rss_bytes()}))
    return

  work = Path(args.workdir)
  hf = work / "hf"
  ckpt = Path(args.ckpt_parent or work) / "dsv32-bench-ckpt"
  work.mkdir(parents=True, exist_ok=True)
  if not (hf / "config.json").exists():
    shutil.rmtree(hf, ignore_errors=True)
    print(f"writing a synthetic checkpoint with {args.experts} experts per layer -> {hf}", flush=True)
    run_step("write", hf=hf, experts=args.experts)
  summary = {"experts": args.experts, "workers": args.workers, "weights": args.weights, "ckpt": str(ckpt),
             "load_average": os.getloadavg(),
             "source_bytes": sum(f.stat().st_size for f in shard_files(hf)), "runs": {}}
  for cache in (["warm", "cold"] if args.cache == "both" else [args.cache]):
    runs = {"read": [], "copy": [], "convert": []}
    for _ in range(args.repeats):
      for step in ("read", "copy", "convert"):
        shutil.rmtree(ckpt, ignore_errors=True)
        if cache == "cold":
          drop_from_page_cache(shard_files(hf))
        else:
          run_step("read", hf=hf)  # bring the shards into the page cache
        kw = dict(hf=hf) if step == "read" else dict(hf=hf, ckpt=ckpt) if step == "copy" else \
            dict(hf=hf, ckpt=ckpt, workers=args.workers, weights=args.weights)
        r = run_step(step, **kw)
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        runs[step].append(r)
        print(f"{cache} {step}: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.2f} s = {r['gb_per_s']:.2f} GB/s, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    best = {step: max(rs, key=lambda r: r["gb_per_s"]) for step, rs in runs.items()}
    conv = best["convert"]
    summary["runs"][cache] = {
        "read_gb_per_s": best["read"]["gb_per_s"],
        "convert_gb_per_s": conv["gb_per_s"],
        "copy_gb_per_s": best["copy"]["gb_per_s"],
        "ratio": conv["gb_per_s"] / best["read"]["gb_per_s"],
        "ratio_to_copy": conv["gb_per_s"] / best["copy"]["gb_per_s"],
        "convert_peak_rss_mib": max(r["peak_rss_bytes"] for r in runs["convert"]) / 2**20,
        "read_peak_rss_mib": max(r["peak_rss_bytes"] for r in runs["read"]) / 2**20,
        "largest_tensor_mib": conv["largest_tensor_bytes"] / 2**20,
        "all": runs,
    }
  shutil.rmtree(ckpt, ignore_errors=True)
  if not args.keep:
    shutil.rmtree(hf, ignore_errors=True)
  text = json.dumps({k: v for k, v in summary.items()}, indent=2)
  if args.out:
    Path(args.out).write_text(text)
  for cache, r in summary["runs"].items():
    print(f"{cache}: read {r['read_gb_per_s']:.2f} GB/s, copy {r['copy_gb_per_s']:.2f} GB/s, convert "
          f"{r['convert_gb_per_s']:.2f} GB/s ({100 * r['ratio']:.0f}% of read, {100 * r['ratio_to_copy']:.0f}% of copy), "
          f"convert peak RSS {r['convert_peak_rss_mib']:.0f} MiB, "
          f"largest tensor {r['largest_tensor_mib']:.0f} MiB")


if __name__ == "__main__":
  main()
