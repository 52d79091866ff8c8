"""One of two processes joined with ``jax.distributed.initialize`` (CPU, gloo, localhost coordinator).

  python tests/sharded_two_process_worker.py PROCESS_ID PORT OUT_JSON

Each process has 4 CPU devices; the mesh is (data 1, expert 8, tensor 1) over all 8, so the expert
all-to-alls cross the process boundary. Both run the sharded prefill and decode steps; process 0 then
runs the unsharded reference on its first device and writes the relative errors to OUT_JSON.
Started by ``tests/test_sharding.py::test_two_processes_give_the_unsharded_logits``.
"""

import json
import os
import sys

process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from dsv32_jax.config import preset  # noqa: E402
from dsv32_jax.params import init_params  # noqa: E402
from sharding.plan import ShardingPlan  # noqa: E402
from sharding.rules import make_mesh  # noqa: E402
from tests.sharding_common import F32_FP8, inputs, reference_logits, rel_err, sharded_logits  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4 and jax.process_count() == 2
cfg = preset("tiny").replace(index_topk=16)
params = init_params(cfg, seed=11, fp8=True)   # the same host values in both processes
tokens, lengths, feed = inputs(cfg, seed=3)
plan = ShardingPlan(make_mesh(1, 8, 1))
prefill, decode, placed, _, _ = sharded_logits(plan, cfg, params, F32_FP8, tokens, lengths, feed)
experts = placed["moe_layers"]["ffn"]["experts"]["w1"]["weight"]
local_experts = {tuple(s.data.shape)[1] for s in experts.addressable_shards}
if process_id == 0:
  ref_prefill, ref_decode = reference_logits(cfg, params, F32_FP8, tokens, lengths, feed)
  with open(out_path, "w") as f:
    json.dump({"prefill": rel_err(prefill, ref_prefill), "decode": rel_err(decode, ref_decode),
               "experts_per_device": sorted(local_experts), "devices": jax.device_count(),
               "processes": jax.process_count()}, f)
jax.distributed.shutdown()
