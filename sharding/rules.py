"""The mesh and the table of logical-axis rules: the whole sharding of the model in one place.

The mesh has three axes, named for what they do (outermost first, so that on a GPU cluster the
innermost axes fall on the fastest links)::

  data    independent replicas of the model: whole sequences go to different replicas
  expert  routed experts are split along it (expert parallelism); attention is data-parallel along it
  tensor  attention heads, dense FFN / shared-expert hidden units, and each expert's hidden units are
          split along it (tensor parallelism: partial sums are reduced over it)

Every array of the model has logical axis names (``dsv32_jax.params`` for parameters, the constants
below for activations and the cache); ``Rules`` maps each logical name to a tuple of mesh axes.
``partition_spec`` turns (logical axes, shape) into a ``PartitionSpec``: dimension by dimension, a
mesh axis is used when it is not used already by an earlier dimension of the same array and the
sizes chosen so far times its size divide the dimension (otherwise that mesh axis is skipped and
the dimension is replicated along it). So a batch of 2 on an 8-way expert axis is replicated, and
an FP8 weight is split only where its 128x128 scale grid splits the same way (callers pass both
shapes), which keeps every block of the release's format on one device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

# Logical axes of activations and of the cache (parameters' are in dsv32_jax.params).
RESIDUAL = ("batch", "sequence", "embed")
TOKENS = ("batch", "sequence")
LOGITS = (None, "vocab")  # split like the head that makes them (its weight dwarfs the hidden states)
CACHE = {  # cache_lib.LayerCache fields: [layers, batch, slots, ...]
    "kv": ("layers", "batch", "cache_sequence", "kv_lora"),
    "k_pe": ("layers", "batch", "cache_sequence", "rope"),
    "index_k": ("layers", "batch", "cache_sequence", "index_dim"),
    "index_k_scale": ("layers", "batch", "cache_sequence"),
    "kv_scale": ("layers", "batch", "cache_sequence", None),
}

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "expert")),   # attention is data-parallel over both (DeepSeek's "DP attention")
    ("sequence", ()),
    ("cache_sequence", ()),          # a sequence's cache stays on the devices that serve it
    ("rope", ()),
    # parameters
    ("layers", ()),                  # the lax.scan axis
    ("vocab", ("tensor", "expert")),  # embedding and head rows; the head runs in float32
    ("embed", ()),                   # the residual stream is never split: every layer reads all of it
    ("q_lora", ()),
    ("kv_lora", ()),                 # the latent: one per token, shared by all heads
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("o_heads", ("tensor",)),
    ("index_heads", ("tensor",)),
    ("index_n_heads", ("tensor",)),
    ("index_dim", ()),
    ("mlp", ("tensor",)),            # dense FFN and shared-expert hidden units
    ("router", ()),                  # every device scores its tokens against all experts
    ("experts", ("expert",)),
    ("expert_mlp", ("tensor",)),     # each expert's hidden units
)


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical axis name -> mesh axes (a hashable table; ``replace`` overrides entries)."""

  table: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

  def __post_init__(self):
    names = [name for name, _ in self.table]
    if len(set(names)) != len(names):
      raise ValueError(f"Rules: a logical axis appears twice in {names}")
    for name, axes in self.table:
      if not isinstance(axes, tuple) or any(a not in MESH_AXES for a in axes):
        raise ValueError(f"Rules: '{name}' -> {axes!r}: expected a tuple of mesh axes from {MESH_AXES}")

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    for name, axes in self.table:
      if name == logical:
        return axes
    raise KeyError(f"no sharding rule for the logical axis '{logical}'; add it to sharding.rules.DEFAULT_RULES")

  def replace(self, **changes: Sequence[str]) -> "Rules":
    table = dict(self.table)
    for name, axes in changes.items():
      if name not in table:
        raise KeyError(f"Rules.replace: unknown logical axis '{name}'")
      table[name] = tuple(axes)
    return Rules(tuple(table.items()))

  @property
  def logical_axes(self) -> frozenset[str]:
    return frozenset(name for name, _ in self.table)


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, expert, tensor) mesh over `devices` (default: all devices, or the first data*expert*tensor
  of them in a single process). Axis types are Auto: layouts inside jit follow the rules' constraints
  and XLA's propagation."""
  n = data * expert * tensor
  if min(data, expert, tensor) < 1:
    raise ValueError(f"make_mesh: axis sizes must be positive, got data={data} expert={expert} tensor={tensor}")
  if devices is None:
    devices = jax.devices()
    if n < len(devices):
      if jax.process_count() > 1:
        raise ValueError(f"make_mesh: {n} devices asked for, but a multi-process mesh must span all "
                         f"{len(devices)} devices")
      devices = devices[:n]
  if len(devices) != n:
    raise ValueError(f"make_mesh: data={data} x expert={expert} x tensor={tensor} = {n} devices, "
                     f"but {len(devices)} given")
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((data, expert, tensor), MESH_AXES, axis_types=auto, devices=devices)


def partition_spec(rules: Rules, mesh_shape: Mapping[str, int], axes: Sequence[str | None],
                   *shapes: Sequence[int]) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes; every shape in `shapes` (the array's, and
  for an FP8 weight its scale grid's) must split evenly along the chosen mesh axes."""
  if not shapes:
    raise ValueError("partition_spec needs the array's shape")
  for shape in shapes:
    if len(shape) != len(axes):
      raise ValueError(f"partition_spec: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, logical in enumerate(axes):
    chosen: list[str] = []
    for mesh_axis in rules.mesh_axes(logical):
      size = mesh_shape.get(mesh_axis, 1)
      if mesh_axis in used or size == 1:
        continue
      ways = math.prod(mesh_shape[a] for a in chosen) * size
      if all(shape[dim] % ways == 0 for shape in shapes):
        chosen.append(mesh_axis)
        used.add(mesh_axis)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_size(mesh: Mesh, axes: Iterable[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)
