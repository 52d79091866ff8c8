"""Our checkpoint directory, and how its arrays are written: slice by slice, with TensorStore, in
exactly the layout Orbax writes, so that Orbax restores it like any checkpoint of its own.

Layout of CKPT_DIR::

  config.json          the Hugging Face config the weights came with
  dsv32_meta.json      converter version, weight mode, the source's config, sha256 and size of every shard
  source_index.json    the source's tensor -> shard map and per-shard safetensors metadata (for export)
  params/              an Orbax PyTree checkpoint (OCDBT + zarr3) of the ``dsv32_jax.params`` pytree

Why not ``ocp.StandardCheckpointer().save(params)``: Orbax saves a pytree of arrays held in memory,
and the 671B release is ~690 GB. Saving leaf by leaf (Orbax's ``partial_save_mode``) bounds memory by
the largest *leaf*, and our leaves are stacked: the routed experts' ``w1`` of the 58 MoE layers is one
[58, 256, 2048, 7168] e4m3 array of 218 GB. Bounded memory needs writes of one *slice* (one layer, one
expert) at a time, which Orbax's save API does not offer; TensorStore, which Orbax writes through, does.

So we create every array up front with Orbax's own TensorStore spec (``ArrayWriteSpec``: zarr3 with
the ``sharding_indexed`` codec inside one OCDBT database, the file layout, chunk and OCDBT options it
uses) and pass it ``write_shape`` = one slice. Chunks then divide a slice and never straddle two, so
each slice is written by one aligned, independent TensorStore write (no read-modify-write); the
converter groups ~16 MiB of such writes in one TensorStore transaction, i.e. one OCDBT commit, and
logs them as done once the commit has resolved: that is what makes ``--resume`` exact. When every
slice is written we write Orbax's metadata with Orbax's own
classes (``InternalTreeMetadata`` -> ``_METADATA``, the ``array_metadatas`` store, ``StepMetadata`` ->
``_CHECKPOINT_METADATA``). The result is what ``StandardCheckpointer(use_zarr3=True)`` leaves after its
OCDBT merge, with three differences, none of which a reader sees: one OCDBT database written directly
(Orbax writes one per process and merges them at the end); no ``_sharding`` file (a converted
checkpoint has no device layout; ``load_checkpoint`` always gives Orbax a target sharding); B-tree
nodes of at most 1 MiB instead of Orbax's 100 MB (readers take the node size from the manifest). Orbax
writes a checkpoint in one commit, so one giant root node costs it nothing; we commit ~16 MiB at a time,
and every commit re-encodes the nodes it touches: with one node holding all ~100k keys of the 671B
checkpoint, 154k keys in 1,536 commits took 37 s (the last quarter 3x the first: quadratic), with 1 MiB
nodes 18 s (linear).

Chunks are at most ``CHUNK_BYTES`` (Orbax's subchunking picks the shape), so a host that restores a
shard of an array reads little more than its shard. No compression: FP8 weights hardly compress, and
zstd would cost CPU time on every byte of a conversion that is already CPU- or disk-bound.

TensorStore runs with ``file_io_sync`` off (an fsync per write made it 8x slower here); the converter
fsyncs every file once before the atomic rename (``fsync_tree``). A killed process loses nothing
(the kernel holds the written pages); after an OS crash, delete the partial directory and start again.

This uses Orbax 0.12 internals (``_src.serialization.tensorstore_utils``, ``_src.metadata``); the tests
restore through Orbax's public API, so a change in them fails loudly.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store, checkpoint as checkpoint_metadata
from orbax.checkpoint._src.metadata import step_metadata_serialization
from orbax.checkpoint._src.metadata import tree as tree_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types as serialization_types

from convert.plan import OutputLeaf

FORMAT_VERSION = 2
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
META_FILE = "dsv32_meta.json"
SOURCE_INDEX_FILE = "source_index.json"
CHUNK_BYTES = 64 << 20
BTREE_NODE_BYTES = 1 << 20
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def ts_context(file_io_concurrency: int = 64, ocdbt_cache_bytes: int = 16 << 20) -> ts.Context:
  """Orbax's OCDBT context (its specs name the B-tree node cache ``cache_pool#ocdbt``), without fsyncs.

  Orbax gives that cache 100 MB; old B-tree node versions pile up in it commit after commit, so we give it
  16 MB, about the newest version of the whole tree of the 671B checkpoint (~150k chunk keys)."""
  return ts.Context({
      "file_io_concurrency": {"limit": file_io_concurrency},
      "cache_pool#ocdbt": {"total_bytes_limit": ocdbt_cache_bytes},
      "file_io_sync": False,
  })


def array_write_spec(params_dir: Path, leaf: OutputLeaf) -> ts_utils.ArrayWriteSpec:
  return ts_utils.ArrayWriteSpec(
      str(Path(params_dir).absolute()), leaf.name, global_shape=leaf.shape, write_shape=leaf.slice_shape,
      dtype=leaf.dtype, chunk_byte_size=CHUNK_BYTES, use_compression=False, use_zarr3=True, use_ocdbt=True)


def write_tspec(params_dir: Path, leaf: OutputLeaf) -> dict:
  """Orbax's TensorStore spec for the array, with B-tree nodes of at most ``BTREE_NODE_BYTES``."""
  tspec = array_write_spec(params_dir, leaf).json
  tspec["kvstore"]["config"]["max_decoded_node_bytes"] = BTREE_NODE_BYTES
  return tspec


def open_for_write(params_dir: Path, leaves: Iterable[OutputLeaf], context: ts.Context) -> dict[tuple, ts.TensorStore]:
  """Creates the arrays (or opens them, when resuming; the stored spec must match)."""
  futures = {leaf.path: ts.open(write_tspec(params_dir, leaf), create=True, open=True, context=context)
             for leaf in leaves}
  return {path: f.result() for path, f in futures.items()}


def open_for_read(params_dir: Path, name: str, context: ts.Context) -> ts.TensorStore:
  spec = ts_utils.ArrayReadSpec(str(Path(params_dir).absolute()), name, use_zarr3=True, use_ocdbt=True)
  return ts.open(spec.json, read=True, context=context).result()


def write_orbax_metadata(params_dir: Path, leaves: Iterable[OutputLeaf], init_ns: int) -> None:
  """``_METADATA``, ``array_metadatas/process_0`` and ``_CHECKPOINT_METADATA``, built by Orbax's classes."""
  directory = epath.Path(Path(params_dir).absolute())
  leaves = list(leaves)
  infos: dict = {}
  for leaf in leaves:
    node = infos
    for key in leaf.path[:-1]:
      node = node.setdefault(key, {})
    node[leaf.path[-1]] = serialization_types.ParamInfo(
        name=leaf.name, parent_dir=directory, keypath=leaf.path, value_typestr="jax.Array",
        write_shape=leaf.slice_shape, is_ocdbt_checkpoint=True, use_zarr3=True)
  tree = tree_metadata.InternalTreeMetadata.build(infos, use_ocdbt=True, use_zarr3=True)
  (directory / "_METADATA").write_text(json.dumps(tree.to_json()))
  array_metadatas = [array_write_spec(params_dir, leaf).metadata for leaf in leaves]
  asyncio.run(array_metadata_store.Store().write(directory, array_metadatas, process_index=0))
  step = checkpoint_metadata.StepMetadata(item_handlers=STANDARD_HANDLER, init_timestamp_nsecs=init_ns,
                                          commit_timestamp_nsecs=time.time_ns())
  checkpoint_metadata.metadata_store(enable_write=True, blocking_write=True).write(
      checkpoint_metadata.step_metadata_file_path(directory), step_metadata_serialization.serialize(step))


def stored_leaves(params_dir: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
  """Path -> (shape, dtype) of every array of an Orbax checkpoint, from its metadata."""
  import orbax.checkpoint as ocp
  meta = ocp.StandardCheckpointer().metadata(Path(params_dir).absolute())
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, (*prefix, k))
    else:
      out[prefix] = (tuple(node.shape), np.dtype(node.dtype))
  walk(dict(tree), ())
  return out


def fsync_tree(root: Path) -> None:
  """fsync every file and directory under root (TensorStore wrote without fsync)."""
  for dirpath, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
