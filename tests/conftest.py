"""Shared fixtures. Tests compare with float32 references by relative norm error on fresh random inputs."""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from dsv32_jax.config import preset  # noqa: E402
from dsv32_jax.params import init_params  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

# Pallas's Triton lowering asks the device for its compute capability; lowering on this CPU for an
# H100 names one abstractly (`with jax.sharding.use_abstract_mesh(H100_ABSTRACT): ...lower(...)`).
H100_ABSTRACT = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                                              platform="cuda"))


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (run through the device tool)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg():
  """The tiny preset with a small top-k so that the indexer selects at test lengths."""
  return preset("tiny").replace(index_topk=16)


@pytest.fixture(scope="session")
def tiny_params_fp8(tiny_cfg):
  return jax.tree.map(jnp.asarray, init_params(tiny_cfg, seed=11, fp8=True))


@pytest.fixture(scope="session")
def tiny_params_bf16(tiny_cfg):
  return jax.tree.map(jnp.asarray, init_params(tiny_cfg, seed=12, fp8=False))


@pytest.fixture
def rng(request):
  """A fresh generator per test, seeded from the test's name (reproducible, different per test)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
