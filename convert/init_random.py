"""Random checkpoints in the exact format of the Hugging Face release (for demos, tests, benchmarks).

FP8 e4m3 linear weights with ue8m0 128x128 ``weight_scale_inv`` blocks, bf16 embeddings, norms,
router and indexer ``weights_proj``, float32 ``e_score_correction_bias``, the MTP layers with their
copies of the embedding and head, several shards, ``model.safetensors.index.json`` and ``config.json``.

``write_random_checkpoint`` initialises a model that computes sensibly (``init_params``) and holds it
in memory. ``write_synthetic_checkpoint`` writes the same names, shapes and dtypes from a pool of
random bytes, streaming, at disk speed: multi-GB checkpoints for the converter's memory test and
benchmark, whose values mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from convert.hf_layout import TOP_LEVEL, hf_name_grid, mtp_copy_names
from convert.hf_to_params import _layer_key, hf_tensors
from convert.safetensors_io import write_sharded
from dsv32_jax.config import ModelConfig
from dsv32_jax.params import flatten_specs, init_params, model_specs, scale_shape


def write_random_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0, fp8: bool = True,
                            n_shards: int = 4) -> Path:
  out = Path(out_dir)
  params = init_params(cfg, seed=seed, fp8=fp8)
  total = sum(a.nbytes for _, a in hf_tensors(cfg, params))
  write_sharded(hf_tensors(cfg, params), out, shard_bytes=max(1, -(-total // n_shards)))
  (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(fp8=fp8), indent=2))
  return out


def release_tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(name, shape, dtype) of every tensor of a release checkpoint, in layer order."""
  fp8, bf16 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.bfloat16)
  out = []
  for path, spec in flatten_specs(model_specs(cfg)):
    grid = hf_name_grid(cfg, path)
    inner = spec.shape[grid.ndim:]
    quantised = path[-1] == "weight" and spec.fp8_in_release
    dtype = fp8 if quantised else np.dtype(np.float32) if spec.init == "bias" else bf16
    for name in grid.flat:
      out.append((name, inner, dtype))
      if quantised:
        out.append((name + "_scale_inv", scale_shape(inner), np.dtype(np.float32)))
  by_name = {name: (shape, dtype) for name, shape, dtype in out}
  for name, leaf in mtp_copy_names(cfg).items():
    out.append((name, *by_name[TOP_LEVEL[leaf]]))
  return sorted(out, key=lambda t: _layer_key(t[0]))


def _synthetic_tensors(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
  specs = release_tensor_specs(cfg)
  largest = max(int(np.prod(s)) * d.itemsize for _, s, d in specs)
  rng = np.random.default_rng(seed)
  pool_bytes = largest + (1 << 20)
  fp8_pool = rng.integers(0, 256, pool_bytes, dtype=np.uint8)
  fp8_pool[(fp8_pool & 0x7F) == 0x7F] = 0  # no e4m3 NaNs
  fp8_pool = fp8_pool.view(ml_dtypes.float8_e4m3fn)
  bf16_pool = (0.02 * rng.standard_normal(pool_bytes // 2, np.float32)).astype(ml_dtypes.bfloat16)
  copies = {}
  for name, shape, dtype in specs:
    n = int(np.prod(shape))
    if name in copies:
      yield name, copies[name]
      continue
    if dtype == np.float32 and name.endswith("_scale_inv"):
      array = np.exp2(-rng.integers(4, 12, shape)).astype(np.float32)
    elif dtype == np.float32:
      array = rng.standard_normal(shape, np.float32) * np.float32(0.1)
    else:
      pool = fp8_pool if dtype.itemsize == 1 else bf16_pool
      start = int(rng.integers(0, pool.size - n + 1))
      array = pool[start:start + n].reshape(shape)
    for copy, leaf in mtp_copy_names(cfg).items():
      if name == TOP_LEVEL[leaf]:
        copies[copy] = array
    yield name, array


def write_synthetic_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0,
                               shard_bytes: int = 256 << 20) -> Path:
  """A release-format checkpoint of random bytes (no e4m3 NaNs; power-of-two scales), written streaming:
  memory holds one shard (`shard_bytes`) plus a pool of the largest tensor's size."""
  out = Path(out_dir)
  write_sharded(_synthetic_tensors(cfg, seed), out, shard_bytes=shard_bytes)
  (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(fp8=True), indent=2))
  return out
