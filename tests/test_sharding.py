"""Named-axis sharding: the rules table, and sharded = unsharded logits on 8 devices and on 2 processes.

Multi-device checks need ``--xla_force_host_platform_device_count`` before JAX starts, so they run in
subprocesses: ``tests/sharded_checks_8dev.py`` (a pytest file of its own) and two copies of
``tests/sharded_two_process_worker.py`` joined with ``jax.distributed.initialize``.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv32_jax.config import preset
from dsv32_jax.options import RunOptions
from dsv32_jax.params import flatten_specs, model_specs, scale_shape
from sharding import rules as rules_lib
from sharding.expert_parallel import receive_bounds
from sharding.plan import ShardingPlan
from sharding.rules import DEFAULT_RULES, Rules, make_mesh, partition_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(xla_flags: str | None = None) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def test_every_logical_axis_has_exactly_one_rule():
  rules = Rules()
  used = {a for cfg in (preset("v32-671b"), preset("tiny")) for _, spec in flatten_specs(model_specs(cfg))
          for a in spec.axes}
  used |= set(rules_lib.RESIDUAL) | set(rules_lib.LOGITS) | {a for axes in rules_lib.CACHE.values() for a in axes}
  assert used - {None} == rules.logical_axes  # no parameter falls through to a default, no stale rule
  with pytest.raises(KeyError, match="no sharding rule"):
    rules.mesh_axes("heads_typo")
  with pytest.raises(ValueError, match="mesh axes"):
    Rules(DEFAULT_RULES + (("extra", ("pipeline",)),))


def test_partition_spec_splits_only_what_divides_and_uses_a_mesh_axis_once():
  rules = Rules()
  mesh = {"data": 2, "expert": 4, "tensor": 2}
  assert partition_spec(rules, mesh, rules_lib.RESIDUAL, (16, 7, 64)) == P(("data", "expert"))
  assert partition_spec(rules, mesh, rules_lib.RESIDUAL, (2, 7, 64)) == P("data")      # 2 sequences: data only
  assert partition_spec(rules, mesh, rules_lib.RESIDUAL, (1, 7, 64)) == P()            # 1 sequence: replicated
  # 671B routed experts: 256 over expert, 2048 hidden over tensor; FP8 scale grid 16 rows splits too
  w1 = (58, 256, 2048, 7168)
  assert partition_spec(rules, mesh, ("layers", "experts", "expert_mlp", "embed"), w1, scale_shape(w1)) == \
      P(None, "expert", "tensor")
  # 128 hidden units are one FP8 block: not split, although 128 divides by 2
  small = (2, 16, 128, 256)
  assert partition_spec(rules, mesh, ("layers", "experts", "expert_mlp", "embed"), small, scale_shape(small)) == \
      P(None, "expert")
  assert partition_spec(rules, mesh, ("layers", "experts", "expert_mlp", "embed"), small) == \
      P(None, "expert", "tensor")                                                    # bf16: no blocks
  # a rule naming the same mesh axis for two dims of one array: the first dim gets it
  twice = rules.replace(vocab=("tensor",), embed=("tensor",))
  assert partition_spec(twice, mesh, ("vocab", "embed"), (1024, 256)) == P("tensor")


def test_receive_bounds():
  cfg = preset("v32-671b")
  fast, worst = receive_bounds(512, cfg, 8, 2.0)  # 32 experts per device: all 8 of a token's may be here
  assert worst == 8 * 512 * 8 and fast == 2 * 512 * 8
  fast, worst = receive_bounds(512, cfg, 64, 2.0)  # 4 per device: at most 4 of a token's 8
  assert worst == 64 * 512 * 4 and fast == 8192
  assert receive_bounds(512, cfg, 64, None) == (worst, worst)


def test_unsharded_path_is_the_default():
  assert RunOptions().sharding is None
  x = object()
  assert RunOptions().constrain(x, ("batch",)) is x


@pytest.mark.slow
def test_sharded_logits_equal_unsharded_on_eight_devices():
  """Meshes 1, 2 data x 4 expert, 8 expert, 2 x 2 x 2: prefill and decode logits; both dispatch paths."""
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         os.path.join(ROOT, "tests", "sharded_checks_8dev.py")],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200,
                        env=_env("--xla_force_host_platform_device_count=8"))
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_unsharded_logits(tmp_path):
  out, port = tmp_path / "result.json", _free_port()
  worker = os.path.join(ROOT, "tests", "sharded_two_process_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=900)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-4000:] for log in logs)
  result = json.loads(out.read_text())
  assert result["devices"] == 8 and result["processes"] == 2
  assert result["experts_per_device"] == [preset("tiny").n_routed_experts // 8]
  assert result["prefill"] < 1e-5 and result["decode"] < 1e-5, result


@pytest.mark.slow
def test_full_model_benchmark_runs_on_eight_devices(tmp_path):
  """benchmarks/full_671b.py (the 8-GPU run of the whole model) end to end on 8 CPU devices, tiny preset."""
  out = tmp_path / "full.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "full_671b.py"), "--preset", "tiny",
                         "--prefill", "64", "--decode-batch", "8", "--decode-context", "64", "--iters", "0",
                         "--decode-steps", "1", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=_env("--xla_force_host_platform_device_count=8"))
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 8 and result["mesh"] == [1, 8, 1]
  names = [row["what"] for row in result["rows"]]
  assert names == ["dsa prefill 64", "dsa decode batch 8 at 64", "dense prefill 64", "dense decode batch 8 at 64"]
  assert all(np.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in result["rows"])
  assert set(result["dsa_over_dense_throughput"]) == {"prefill 64", "decode batch 8 at 64"}


def test_layered_draw_equals_its_layers(monkeypatch):
  """ep_layers.draw_params: a stacked leaf drawn one layer at a time has every layer drawn (none left zero)."""
  from benchmarks import ep_layers
  from sharding.plan import abstract_params
  monkeypatch.setattr(ep_layers, "LAYERED_DRAW_BYTES", 0)
  cfg = preset("tiny")
  plan = ShardingPlan(make_mesh(1, 1, 1))
  params = ep_layers.draw_params(cfg, jax.random.key(0), True, abstract_params(plan, cfg, fp8=True))
  w = np.asarray(params["moe_layers"]["ffn"]["experts"]["w1"]["weight"]).astype(np.float32)
  assert w.shape[0] == cfg.n_layers - cfg.n_dense_layers and all(np.abs(w[i]).sum() > 0 for i in range(w.shape[0]))
  assert not np.array_equal(w[0], w[1])


_MOE_LAYER_CHECK = """
import jax
from benchmarks.ep_layers import moe_layer_check
from dsv32_jax.config import preset
from sharding.plan import ShardingPlan
from sharding.rules import make_mesh
plan = ShardingPlan(make_mesh(1, 2, 1, devices=jax.devices()[:2]))
print(moe_layer_check(plan, preset("tiny"), True, jax.devices()[0], jax.random.key(0), tokens=128))
"""


def test_ep_benchmark_moe_layer_check_on_two_devices():
  """The MoE-layer equality check that ep_layers judges for FP8 weights on a GPU: EP over 2 devices vs one,
  the same layer and inputs (on the CPU the experts run ragged; the kernel runs there on a GPU)."""
  proc = subprocess.run([sys.executable, "-c", _MOE_LAYER_CHECK], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=_env("--xla_force_host_platform_device_count=2"))
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
