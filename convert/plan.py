"""The conversion plan: which source tensor becomes which slice of which output array.

Pure: it reads nothing but the safetensors headers it is given (``safetensors_io.read_headers``), so
every structural problem of a checkpoint -- a missing or unknown tensor, a shape that the config does
not imply, a wrong or mixed dtype, an FP8 weight without its block scale -- is reported, naming the
file and the tensor, before a single byte is written.

An output *leaf* is one array of the ``dsv32_jax.params`` pytree, stacked over layers (and routed
experts); each source tensor fills one *slice* of it (``leaf[layer, expert]``). Jobs are listed in
source order (shard by shard, tensor by tensor), so a streaming reader visits every shard once.

``--weights fp8`` (default) keeps e4m3 weights and their float32 ``weight_scale_inv`` bit for bit.
``--weights bf16`` dequantises: ``W = float32(W8) * scale_inv`` per 128x128 block (exactly, in float32,
as ``dsv32_jax.quant.dequant_weight`` does), rounded to bfloat16. Float tensors keep their dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from jaxtyping import Float

from convert.hf_layout import hf_name_grid, mtp_copy_names
from convert.safetensors_io import CheckpointError, TensorHeader
from dsv32_jax.config import FP8_BLOCK, ModelConfig
from dsv32_jax.params import flatten_specs, model_specs, scale_shape

WEIGHT_MODES = ("fp8", "bf16")
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (BF16, np.dtype(np.float16), np.dtype(np.float32))
SCALE_SUFFIX = "_scale_inv"


@dataclasses.dataclass(frozen=True)
class OutputLeaf:
  """One array of the parameter pytree: its path, stacked shape and stored dtype."""

  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  grid_ndim: int  # leading axes filled one source tensor at a time: 0 (top level), 1 (layers), 2 (+ experts)

  @property
  def name(self) -> str:
    """The parameter's name in the Orbax checkpoint (Orbax joins the tree path with dots)."""
    return ".".join(self.path)

  @property
  def slice_shape(self) -> tuple[int, ...]:
    return (1,) * self.grid_ndim + self.shape[self.grid_ndim:]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorJob:
  """Source tensor -> ``leaf[index]``."""

  source: TensorHeader
  leaf: tuple[str, ...]
  index: tuple[int, ...]
  dequant_scale: TensorHeader | None = None  # bf16 mode: the weight's weight_scale_inv
  is_scale: bool = False                     # a weight_scale_inv kept as is (values are checked)


@dataclasses.dataclass(frozen=True)
class CopyCheck:
  """A tensor the release stores twice (the MTP layer's embedding and head): must equal ``leaf``."""

  source: TensorHeader
  leaf: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
  cfg: ModelConfig              # as converted (without MTP if the source has no MTP tensors)
  weights: str
  leaves: tuple[OutputLeaf, ...]
  jobs: tuple[TensorJob, ...]   # source order
  copy_checks: tuple[CopyCheck, ...]
  dropped_mtp: bool             # config.json names MTP layers, the source has none of their tensors

  def leaf(self, path: tuple[str, ...]) -> OutputLeaf:
    return self._by_path[path]

  @functools.cached_property
  def _by_path(self) -> dict[tuple[str, ...], OutputLeaf]:
    return {leaf.path: leaf for leaf in self.leaves}

  @property
  def source_bytes(self) -> int:
    """Bytes read from the source: every job's tensor and every copy (scales read twice in bf16 mode)."""
    return sum(j.source.nbytes + (j.dequant_scale.nbytes if j.dequant_scale else 0) for j in self.jobs) + \
        sum(c.source.nbytes for c in self.copy_checks)

  @property
  def largest_slice_bytes(self) -> int:
    return max(int(np.prod(leaf.slice_shape, dtype=np.int64)) * leaf.dtype.itemsize for leaf in self.leaves)


def without_absent_mtp(cfg: ModelConfig, names) -> ModelConfig:
  """transformers does not model the MTP layers and drops them on save; a checkpoint without any of
  their tensors is read as a model without MTP (the release has them: model.layers.{n_layers}.*)."""
  prefix = f"model.layers.{cfg.n_layers}."
  if cfg.n_mtp_layers and not any(n.startswith(prefix) for n in names):
    return cfg.replace(n_mtp_layers=0)
  return cfg


def _examples(names: list[str], headers: Mapping[str, TensorHeader] | None = None, k: int = 3) -> str:
  shown = [f"'{n}'" + (f" ({headers[n].file})" if headers and n in headers else "") for n in names[:k]]
  more = f" and {len(names) - k} more" if len(names) > k else ""
  return ", ".join(shown) + more


def plan_conversion(cfg: ModelConfig, headers: Mapping[str, TensorHeader], weights: str = "fp8",
                    source: str = "checkpoint") -> ConversionPlan:
  """Checks the headers against the config and maps every tensor. Raises CheckpointError."""
  if weights not in WEIGHT_MODES:
    raise ValueError(f"weights = {weights!r}: expected one of {WEIGHT_MODES}")
  full_cfg = cfg
  cfg = without_absent_mtp(cfg, headers)
  specs = flatten_specs(model_specs(cfg))
  grids = {path: hf_name_grid(cfg, path) for path, _ in specs}
  missing = [n for grid in grids.values() for n in grid.flat if n not in headers]
  if missing:
    raise CheckpointError(f"{source}: {len(missing)} tensor(s) that a DeepSeek-V3.2 model with this config.json has "
                          f"are missing: {_examples(missing)} (is a shard or an index entry missing, or does "
                          "config.json describe another model?)")
  leaves: list[OutputLeaf] = []
  jobs: list[TensorJob] = []
  used: set[str] = set()
  for path, spec in specs:
    grid = grids[path]
    inner = spec.shape[grid.ndim:]
    what = ".".join(path)
    sources = [headers[n] for n in grid.flat]
    for h in sources:
      if h.shape != tuple(inner):
        raise CheckpointError(f"{source}/{h.file}: tensor '{h.name}' has shape {h.shape}; config.json implies "
                              f"{tuple(inner)} for it (parameter {what}). Does config.json match the weights?")
    by_dtype: dict[np.dtype, TensorHeader] = {}
    for h in sources:
      by_dtype.setdefault(h.dtype, h)
    if len(by_dtype) > 1:
      (a, ha), (b, hb) = list(by_dtype.items())[:2]
      raise CheckpointError(f"{source}: tensors of parameter {what} mix dtypes: '{ha.name}' ({ha.file}) is {a}, "
                            f"'{hb.name}' ({hb.file}) is {b}")
    dtype = sources[0].dtype
    used.update(grid.flat)
    scale_names = [n + SCALE_SUFFIX for n in grid.flat]
    present = [n in headers for n in scale_names]
    fp8_weight = path[-1] == "weight" and spec.fp8_in_release
    if fp8_weight and any(present):
      if not all(present):
        lacking = [w for w, p in zip(grid.flat, present) if not p]
        raise CheckpointError(f"{source}: FP8 weight(s) without their block scale: {_examples(lacking, headers)} "
                              f"has no '{lacking[0]}{SCALE_SUFFIX}'")
      if dtype != FP8:
        raise CheckpointError(f"{source}/{sources[0].file}: tensor '{sources[0].name}' has a {SCALE_SUFFIX} but dtype "
                              f"{dtype}; expected float8_e4m3fn")
      scales = [headers[n] for n in scale_names]
      for s in scales:
        if s.shape != scale_shape(inner) or s.dtype != np.float32:
          raise CheckpointError(f"{source}/{s.file}: block scale '{s.name}' is {s.dtype} {s.shape}; expected float32 "
                                f"{scale_shape(inner)} (one per {FP8_BLOCK}x{FP8_BLOCK} block of {inner})")
      used.update(scale_names)
      indices = list(np.ndindex(grid.shape))
      if weights == "fp8":
        leaves.append(OutputLeaf(path, spec.shape, FP8, grid.ndim))
        scale_path = path[:-1] + ("scale",)
        leaves.append(OutputLeaf(scale_path, (*grid.shape, *scale_shape(inner)), np.dtype(np.float32), grid.ndim))
        jobs += [TensorJob(h, path, i) for h, i in zip(sources, indices)]
        jobs += [TensorJob(s, scale_path, i, is_scale=True) for s, i in zip(scales, indices)]
      else:
        leaves.append(OutputLeaf(path, spec.shape, BF16, grid.ndim))
        jobs += [TensorJob(h, path, i, dequant_scale=s) for h, s, i in zip(sources, scales, indices)]
      continue
    if dtype == FP8:
      h = sources[0]
      why = (f"has no {SCALE_SUFFIX}" if fp8_weight else "is a tensor the release stores in floating point")
      raise CheckpointError(f"{source}/{h.file}: tensor '{h.name}' is float8_e4m3fn but {why}")
    if dtype not in FLOAT_DTYPES:
      h = sources[0]
      raise CheckpointError(f"{source}/{h.file}: tensor '{h.name}' has dtype {dtype}; expected one of "
                            f"{[str(d) for d in FLOAT_DTYPES]}")
    leaves.append(OutputLeaf(path, spec.shape, dtype, grid.ndim))
    jobs += [TensorJob(h, path, i) for h, i in zip(sources, np.ndindex(grid.shape))]
  by_path = {leaf.path: leaf for leaf in leaves}
  copy_checks = []
  for name, top in mtp_copy_names(cfg).items():
    if name not in headers:
      continue
    h, leaf = headers[name], by_path[(top,)]
    if h.shape != leaf.shape or h.dtype != leaf.dtype:
      raise CheckpointError(f"{source}/{h.file}: '{name}' is {h.dtype} {h.shape}, but the main model's {top} it "
                            f"copies is {leaf.dtype} {leaf.shape}")
    copy_checks.append(CopyCheck(h, (top,)))
    used.add(name)
  unknown = sorted(set(headers) - used)
  if unknown:
    raise CheckpointError(f"{source}: {len(unknown)} tensor(s) are not part of a DeepSeek-V3.2 model with this "
                          f"config.json: {_examples(unknown, headers)} (does config.json match the weights?)")
  jobs.sort(key=lambda j: (j.source.file, j.source.name))
  return ConversionPlan(cfg, weights, tuple(leaves), tuple(jobs), tuple(copy_checks),
                        dropped_mtp=cfg.n_mtp_layers != full_cfg.n_mtp_layers)


def check_scale(header: TensorHeader, scale: np.ndarray, source: str = "checkpoint") -> None:
  if not np.all(np.isfinite(scale) & (scale > 0)):
    bad = np.argwhere(~(np.isfinite(scale) & (scale > 0)))[0]
    raise CheckpointError(f"{source}/{header.file}: block scale '{header.name}' holds {scale[tuple(bad)]} at "
                          f"{tuple(int(b) for b in bad)}; block scales must be finite and positive (corrupt file?)")


def dequantize_blockwise(weight: np.ndarray, scale: Float[np.ndarray, "ob ib"], dtype=BF16) -> np.ndarray:
  """e4m3 [out, in] * scale_inv per 128x128 block, in float32, rounded to `dtype` -- the arithmetic of
  ``dsv32_jax.quant.dequant_weight`` -- a block row at a time so that the float32 temporary stays small."""
  out_dim, in_dim = weight.shape
  result = np.empty(weight.shape, dtype)
  col_scale = np.repeat(scale, FP8_BLOCK, axis=1)[:, :in_dim]
  for b, r0 in enumerate(range(0, out_dim, FP8_BLOCK)):
    rows = weight[r0:r0 + FP8_BLOCK].astype(np.float32)
    np.multiply(rows, col_scale[b], out=rows)
    result[r0:r0 + FP8_BLOCK] = rows.astype(dtype)
  return result


def job_output(job: TensorJob, read: Callable[[TensorHeader], np.ndarray], source: str = "checkpoint") -> np.ndarray:
  """The slice that `job` writes: the source tensor as stored, or dequantised (bf16 mode)."""
  array = read(job.source)
  if array.shape != job.source.shape or array.dtype != job.source.dtype:
    raise CheckpointError(f"{source}/{job.source.file}: tensor '{job.source.name}' reads as {array.dtype} "
                          f"{array.shape}, its header says {job.source.dtype} {job.source.shape}")
  if job.is_scale:
    check_scale(job.source, array, source)
  if job.dequant_scale is not None:
    scale = read(job.dequant_scale)
    check_scale(job.dequant_scale, scale, source)
    array = dequantize_blockwise(array, scale)
  return array
