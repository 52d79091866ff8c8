"""Every DSA TPU kernel lowers for TPU at the 671B shapes (64 indexer heads x 128, top-k 2048,
128 MLA heads, latent 512 + rope 64), for v5e, v6e and TPU7x, on this CPU.

``jit(f).trace(...).lower(lowering_platforms=("tpu",))`` under an abstract mesh naming the chip runs
Pallas' TPU lowering: block shapes against the (8, 128) tiling, the primitives Mosaic implements, the
chip-dependent rules, and MLIR verification of the Mosaic module. It does not run Mosaic's own
layout and VMEM passes (they live in libtpu): those are checked only on a real TPU (docs/tpu.md).
Nothing here executes.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import index_logits_tpu, sparse_mla_blocks_tpu, sparse_mla_tpu, topk_tpu

CHIPS = ["TPU v5e", "TPU v6e", "TPU7x"]
E4M3, BF16, F32, I32 = jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32, jnp.int32
INDEX_HEADS, INDEX_DIM, TOPK, HEADS, LATENT, ROPE = 64, 128, 2048, 128, 512, 64
# (batch, queries, keys): a 256-query prefill chunk at 32K, and decode of 4 sequences at 128K.
PHASES = {"prefill_32k": (1, 256, 32768), "decode_128k": (4, 1, 131072)}


def lower_for(chip: str, fn, *args):
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=chip, num_cores=1, platform="tpu"))
  with use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("phase", PHASES)
def test_index_logits_lowers(chip, phase):
  b, s, t = PHASES[phase]
  config = index_logits_tpu.IndexLogitsTpuConfig(fp8_matmul=chip == "TPU7x")  # as the dispatch picks
  fn = lambda q, w, k, ks, pos: index_logits_tpu.index_logits(q, w, k, ks, pos, config=config, interpret=False)
  text = lower_for(chip, fn, spec((b, s, INDEX_HEADS, INDEX_DIM), E4M3), spec((b, s, INDEX_HEADS), F32),
                   spec((b, t, INDEX_DIM), E4M3), spec((b, t), F32), spec((b, s), I32))
  assert "dsa_index_logits" in text and "tpu_custom_call" in text


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("phase", PHASES)
def test_topk_lowers(chip, phase):
  b, s, t = PHASES[phase]
  text = lower_for(chip, lambda x: topk_tpu.topk(x, TOPK, interpret=False), spec((b, s, t), F32))
  assert "dsa_topk" in text and "tpu_custom_call" in text


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("variant", ["tokens", "blocks"])
def test_sparse_mla_lowers(chip, phase, variant):
  b, s, t = PHASES[phase]
  s = min(s, 64)  # one query per grid step: 64 queries are representative
  kernel = sparse_mla_tpu.sparse_mla if variant == "tokens" else sparse_mla_blocks_tpu.sparse_mla_blocks
  fn = lambda *args: kernel(*args, 0.1, interpret=False)
  text = lower_for(chip, fn, spec((b, s, HEADS, LATENT), BF16), spec((b, s, HEADS, ROPE), BF16),
                   spec((b, t, LATENT), BF16), spec((b, t, ROPE), BF16), spec((b, s, TOPK), I32))
  assert "tpu_custom_call" in text


def test_lowering_rejects_an_untiled_block():
  """The check has teeth: 3-row blocks are not (8, 128)-tiled and the TPU lowering refuses them."""
  config = topk_tpu.TopkTpuConfig(block_rows=3)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    lower_for("TPU v5e", lambda x: topk_tpu.topk(x, TOPK, config=config, interpret=False), spec((6, 4096), F32))
