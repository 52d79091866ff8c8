"""A sharding plan (mesh + rules + expert-parallel settings) and the placement of parameters and caches.

``ShardingPlan`` is what ``RunOptions.sharding`` holds: the model code asks it for three things only,
``constrain`` (pin an activation to the rules' layout at a layer boundary), ``per_sequence`` (run a
row-independent op on each device's own sequences) and ``moe`` (the expert-parallel MoE,
``sharding.expert_parallel``). Everything else -- where each parameter and cache
array lives -- is derived here from the logical axes in ``dsv32_jax.params`` and ``sharding.rules``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv32_jax import cache as cache_lib
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import Params, is_spec, model_specs, scale_shape
from sharding import rules as rules_lib
from sharding.rules import Rules

EXCHANGES = ("auto", "ragged", "dense")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """How the model is laid out on a mesh. Hashable: it travels inside the static ``RunOptions``.

  expert_exchange: how tokens travel to their experts' devices and back.
    "ragged": ``jax.lax.ragged_all_to_all`` -- each device sends exactly its rows (GPU, TPU);
    "dense": ``jax.lax.all_to_all`` of per-peer buffers padded to a bound that can never overflow
    (XLA:CPU has no ragged all-to-all; also a fallback); "auto": ragged except on CPU.
  expert_capacity_factor: the receive buffer of the fast path holds this many times a device's
    average share of (token, expert) rows; when any device would receive more, every device takes
    the worst-case path for that dispatch round instead (same results: nothing is ever dropped).
    None: always the worst-case buffer.
  expert_round_rows: the worst-case receive buffer, in (token, expert) rows: each device dispatches at
    most expert_round_rows // (EP devices x min(top_k, experts per device)) tokens per round, so that
    even the worst case stays this small (65536 rows of 7168 bf16 = 0.9 GiB).
  """

  mesh: Mesh
  rules: Rules = Rules()
  expert_exchange: str = "auto"
  expert_capacity_factor: float | None = 2.0
  expert_round_rows: int = 65536

  def __post_init__(self):
    if tuple(self.mesh.axis_names) != rules_lib.MESH_AXES:
      raise ValueError(f"ShardingPlan: mesh axes {self.mesh.axis_names}, expected {rules_lib.MESH_AXES} "
                       "(build it with sharding.make_mesh)")
    if self.expert_exchange not in EXCHANGES:
      raise ValueError(f"ShardingPlan.expert_exchange = {self.expert_exchange!r}: expected one of {EXCHANGES}")
    if self.expert_capacity_factor is not None and self.expert_capacity_factor <= 0:
      raise ValueError("ShardingPlan.expert_capacity_factor must be positive or None")
    if self.expert_round_rows < 1:
      raise ValueError("ShardingPlan.expert_round_rows must be positive")

  # -- layouts ----------------------------------------------------------------------------------
  def spec(self, axes: Sequence[str | None], *shapes: Sequence[int]) -> PartitionSpec:
    return rules_lib.partition_spec(self.rules, dict(self.mesh.shape), axes, *shapes)

  def named(self, axes: Sequence[str | None], *shapes: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, *shapes))

  def constrain(self, x, axes: Sequence[str | None]):
    return jax.lax.with_sharding_constraint(x, self.named(axes, x.shape))

  def per_sequence(self, fn):
    """fn run under shard_map on each device's own sequences: arguments and results split on axis 0
    as the rules split ``batch``, replicated along the other mesh axes."""
    def run(*args):
      spec = self.spec(("batch",), args[0].shape[:1])
      return jax.shard_map(fn, mesh=self.mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)
    return run

  @property
  def exchange(self) -> str:
    if self.expert_exchange != "auto":
      return self.expert_exchange
    return "dense" if self.mesh.devices.flat[0].platform == "cpu" else "ragged"

  # -- the model's hook -------------------------------------------------------------------------
  def moe(self, p: dict, cfg: ModelConfig, x, impl: str = "auto"):
    from sharding.expert_parallel import expert_parallel_moe
    return expert_parallel_moe(self, p, cfg, x, impl)


# -- parameters -------------------------------------------------------------------------------------
def map_params(fn, cfg: ModelConfig, params: Params, specs=None) -> dict[str, Any]:
  """fn(array, logical axes, shapes that must split evenly) over a parameter tree (arrays or
  ShapeDtypeStructs). Logical axes come from ``model_specs`` (or `specs`, a matching subtree of it); a
  block-scaled FP8 linear's weight and scale share the weight's axes and both their shapes, so they are
  always split alike."""
  def walk(tree, specs, path):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        if key not in specs or is_spec(specs[key]):
          raise ValueError(f"{'/'.join((*path, key))}: not in the model's parameter specs")
        out[key] = walk(value, specs[key], (*path, key))
        continue
      spec = specs.get("weight" if key == "scale" else key)
      if not is_spec(spec):
        raise ValueError(f"{'/'.join((*path, key))}: not a parameter of the model's specs")
      shapes = (tuple(value.shape),)
      if key in ("weight", "scale") and "scale" in tree:
        shapes = (tuple(tree["weight"].shape), tuple(tree["scale"].shape))
      out[key] = fn(value, spec.axes, shapes)
    return out

  return walk(params, model_specs(cfg) if specs is None else specs, ())


def param_axes(cfg: ModelConfig, params: Params) -> dict[str, Any]:
  """The logical axes of every array of `params`."""
  return map_params(lambda a, axes, shapes: axes, cfg, params)


def param_shardings(plan: ShardingPlan, cfg: ModelConfig, params: Params) -> dict[str, Any]:
  """A NamedSharding for every array of `params` (arrays or ShapeDtypeStructs)."""
  return map_params(lambda a, axes, shapes: plan.named(axes, *shapes), cfg, params)


def _put(x, sharding: NamedSharding):
  if isinstance(x, jax.Array):
    return jax.device_put(x, sharding)
  x = np.asarray(x)  # host data, identical on every process: each process fills its own shards
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_params(plan: ShardingPlan, cfg: ModelConfig, params: Params) -> Params:
  """Places parameters (host numpy or jax arrays) on the mesh."""
  return map_params(lambda a, axes, shapes: _put(a, plan.named(axes, *shapes)), cfg, params)


def abstract_params(plan: ShardingPlan, cfg: ModelConfig, fp8: bool = True) -> Params:
  """ShapeDtypeStructs with shardings for every parameter, in the dtypes ``init_params`` and the
  converter produce (e4m3 + float32 scales for the release's FP8 linears when fp8, else bf16)."""
  def build(specs):
    out = {}
    for key, spec in specs.items():
      if not is_spec(spec):
        out[key] = build(spec)
      elif key == "weight" and spec.fp8_in_release and fp8:
        out[key] = jax.ShapeDtypeStruct(spec.shape, jnp.float8_e4m3fn)
        out["scale"] = jax.ShapeDtypeStruct(scale_shape(spec.shape), jnp.float32)
      else:
        out[key] = jax.ShapeDtypeStruct(spec.shape, jnp.float32 if spec.init == "bias" else jnp.bfloat16)
    return out

  tree = build(model_specs(cfg))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      param_shardings(plan, cfg, tree))


# -- caches -----------------------------------------------------------------------------------------
def cache_shardings(plan: ShardingPlan, cache: cache_lib.LayerCache) -> cache_lib.LayerCache:
  return cache_lib.LayerCache(**{name: plan.named(rules_lib.CACHE[name], getattr(cache, name).shape)
                                 for name in cache_lib.LayerCache._fields})


def abstract_cache(plan: ShardingPlan, cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype,
                   indexer_quant: bool = True, latent_fp8: bool = False) -> cache_lib.LayerCache:
  shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, n_layers, batch, max_len, dtype, indexer_quant,
                                                       latent_fp8))
  shardings = cache_shardings(plan, shapes)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def sharded_cache(plan: ShardingPlan, cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype,
                  indexer_quant: bool = True, latent_fp8: bool = False) -> cache_lib.LayerCache:
  """An empty cache created directly in its sharded layout (no device ever holds all of it)."""
  target = abstract_cache(plan, cfg, n_layers, batch, max_len, dtype, indexer_quant, latent_fp8)
  make = jax.jit(lambda: cache_lib.init_cache(cfg, n_layers, batch, max_len, dtype, indexer_quant, latent_fp8),
                 out_shardings=jax.tree.map(lambda a: a.sharding, target))
  return make()


def bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of sharded arrays or ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total
