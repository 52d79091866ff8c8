"""Named-axis sharding of DeepSeek-V3.2 inference: data, expert and tensor parallelism on one mesh.

- ``rules``: the (data, expert, tensor) mesh and the table mapping every logical axis to mesh axes;
- ``plan``: ``ShardingPlan`` (what ``RunOptions.sharding`` holds) and the placement of parameters and
  caches (real or abstract);
- ``expert_parallel``: the MoE with experts split over devices, tokens exchanged by ragged all-to-all;
- ``serve``: prefill and decode under ``jax.jit`` with explicit in/out shardings;
- ``aot``: ahead-of-time compilation of the 671B model on a simulated mesh, with per-device memory.

See ``docs/architecture.md`` (Sharding) and ``docs/scaling.md``.
"""

from sharding.plan import (ShardingPlan, abstract_cache, abstract_params, bytes_per_device, cache_shardings,
                           param_axes, param_shardings, shard_params, sharded_cache)
from sharding.rules import DEFAULT_RULES, MESH_AXES, Rules, make_mesh, partition_spec

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "Rules", "ShardingPlan", "abstract_cache", "abstract_params", "bytes_per_device",
    "cache_shardings", "make_mesh", "param_axes", "param_shardings", "partition_spec", "shard_params",
    "sharded_cache",
]
