"""Bounded memory: converting a ~1.9 GB release-format checkpoint stays within the README's bound.

The bound (README, "Converting the release"): peak RSS <= baseline + 384 MiB + 3 x workers x the largest
output slice, where baseline is the converter process's RSS before it starts (Python, JAX, Orbax,
TensorStore imported). Measured with ``ru_maxrss`` of a fresh subprocess, which counts the source
shards' memory-mapped pages too. The checkpoint is several times larger than the bound, so a converter
that held the model, a whole stacked array, or a whole shard's mapping would fail.
"""

import json
import os
import subprocess
import sys

import pytest

from convert.safetensors_io import ShardedReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "convert_throughput.py")
MIB = 1 << 20
WORKERS = 2


def bench_step(*args) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, BENCH, "step", *map(str, args)], capture_output=True, text=True, env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path):
  hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
  bench_step("write", "--hf", hf, "--experts", 64)
  source_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
  r = bench_step("convert", "--hf", hf, "--ckpt", ckpt, "--workers", WORKERS)
  bound = 384 * MIB + 3 * WORKERS * r["largest_slice_bytes"]
  assert 2.5 * bound < source_bytes  # the test can tell a bounded converter from one that holds the model
  growth = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
  print(f"source {source_bytes / MIB:.0f} MiB, largest slice {r['largest_slice_bytes'] / MIB:.0f} MiB, "
        f"baseline {r['baseline_rss_bytes'] / MIB:.0f} MiB, peak {r['peak_rss_bytes'] / MIB:.0f} MiB, "
        f"bound on the growth {bound / MIB:.0f} MiB")
  assert growth <= bound, f"peak RSS grew by {growth / MIB:.0f} MiB, more than {bound / MIB:.0f} MiB"
  assert r["tensors"] == len(ShardedReader(hf).weight_map) - 2  # every tensor but the two MTP copies
  assert json.loads((ckpt / "dsv32_meta.json").read_text())["tensors"] == len(ShardedReader(hf).weight_map)
