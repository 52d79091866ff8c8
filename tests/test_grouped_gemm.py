"""The grouped FP8 GEMM of the routed experts (Mosaic GPU; interpreted on the CPU) and its routing glue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax import moe, quant
from dsv32_jax.config import preset
from dsv32_jax.params import init_params
from pallas_kernels import dispatch
from dsv32_jax.layers import linear
from pallas_kernels.grouped_gemm_fp8_mgpu import (GROUPED_ORDER_FROM, GROUPED_ORDER_M, GroupedGemmConfig,
                                                 default_config, dense_config, dense_gemm_fp8, grouped_gemm_fp8,
                                                 grouped_gemm_fp8_reference)
from tests.conftest import rel_err

BM = GroupedGemmConfig().block_m
STACKED = GroupedGemmConfig(block_m=128, block_n=256)  # 2 warpgroups of 64 x 256, sharing the weight tile


def fp8_experts(rng, e, n, k):
  """Random e4m3 [E, N, K] with the release's power-of-two 128x128 block scales."""
  pairs = [quant.quantize_weight_np(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5) for _ in range(e)]
  return jnp.asarray(np.stack([w for w, _ in pairs])), jnp.asarray(np.stack([s for _, s in pairs]))


def block_layout(sizes, unused_blocks=2, bm=BM):
  """block_expert for the given rows per expert, padded to bm, plus some unused blocks."""
  parts = [np.full(-(-z // bm), e) for e, z in enumerate(sizes)] + [np.full(unused_blocks, -1)]
  return np.concatenate(parts).astype(np.int32)


@pytest.mark.parametrize("sizes, n, k, n_weights, config", [
    ([70, 0, 1, 130], 256, 256, 2, GroupedGemmConfig(consumers=1)),  # an empty group, one row, ragged sizes
    ([0, 64, 0], 128, 384, 1, None),                      # one block between empty ones; N = 128: 1 consumer
    ([70, 0, 1, 130], 512, 256, 2, GroupedGemmConfig(consumers=2, max_concurrent_steps=2)),  # warp-specialised
    ([200, 0, 1], 512, 384, 1, GroupedGemmConfig(block_m=128, block_n=256)),  # stacked, 2 scale blocks a warpgroup
    ([1, 130], 256, 256, 2, GroupedGemmConfig(block_m=128, block_n=128, max_concurrent_steps=2)),  # stacked
    ([70, 5], 256, 256, 1, GroupedGemmConfig(consumers=1, block_n=256)),  # one warpgroup, 2 scale blocks
    ([130, 0, 200], 768, 128, 2, GroupedGemmConfig(group_m=3)),  # grouped tile order, a partial last group
])
def test_kernel_equals_the_reference_in_interpret_mode(rng, sizes, n, k, n_weights, config):
  bm = (config or GroupedGemmConfig()).block_m
  be = block_layout(sizes, bm=bm)
  m = len(be) * bm
  xq, xs = quant.act_quant(jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1)), jnp.float32))
  weights = [fp8_experts(rng, len(sizes), n, k) for _ in range(n_weights)]
  args = (xq, xs, tuple(w for w, _ in weights), tuple(s for _, s in weights), jnp.asarray(be))
  got = grouped_gemm_fp8(*args, config, out_dtype=jnp.float32, interpret=True)
  ref = grouped_gemm_fp8_reference(*args, block_m=bm, out_dtype=jnp.float32)
  used = int(np.sum(be >= 0)) * bm
  assert got.shape == (n_weights, m, n)
  assert rel_err(got[:, :used], ref[:, :used]) < 1e-5


def test_kernel_lowers_for_hopper_at_the_671b_shapes():
  cfg = preset("v32-671b")
  e, d, i, m = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, 64 * 300
  f8, s = jnp.float8_e4m3fn, jax.ShapeDtypeStruct
  for config in (GroupedGemmConfig(consumers=1), GroupedGemmConfig(consumers=2), STACKED):
    for n, k, count in ((i, d, 2), (d, i, 1)):  # gate + up in one launch; down
      args = (s((m, k), f8), s((m, k // 128), jnp.float32), (s((e, n, k), f8),) * count,
              (s((e, n // 128, k // 128), jnp.float32),) * count, s((m // config.block_m,), jnp.int32))
      run = jax.jit(lambda *a, config=config: grouped_gemm_fp8(*a, config=config))
      assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def fp8_linear(rng, n, k):
  w, scale = quant.quantize_weight_np(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5)
  return {"weight": jnp.asarray(w), "scale": jnp.asarray(scale)}


@pytest.mark.parametrize("lead, n, k", [
    ((2, 35), 192, 256),  # rows padded to the tile; N = 192: a partial scale block, padded to 256 (2 consumers)
    ((70,), 128, 384),    # one 128-column block: 2 warpgroups stacked (128 x 128)
])
def test_dense_fp8_linear_equals_the_reference_in_interpret_mode(rng, lead, n, k):
  """``layers.linear`` with impl="pallas" off a GPU: act_quant + the FP8 GEMM (interpreted) against the
  reference's product of the dequantised operands, in float32."""
  p = fp8_linear(rng, n, k)
  x = jnp.asarray(rng.standard_normal((*lead, k)) * rng.uniform(0.1, 10, (*lead, 1)), jnp.float32)
  assert dispatch.fp8_linear_backend("pallas", True, k, jnp.float32) == "interpret"
  assert dispatch.fp8_linear_backend("reference", True, k, jnp.bfloat16) is None
  assert dispatch.fp8_linear_backend("auto", True, k, jnp.float32) is None  # float32 runs stay exact
  with pytest.raises(ValueError, match="input features"):
    dispatch.fp8_linear_backend("pallas", True, k + 64, jnp.bfloat16)
  got = linear(p, x, impl="pallas")
  assert got.shape == (*lead, n) and got.dtype == jnp.float32
  assert rel_err(got, linear(p, x)) < 1e-5


@pytest.mark.parametrize("config", [STACKED, GroupedGemmConfig(block_m=128, block_n=128, group_m=2)])
def test_dense_fp8_linear_with_the_stacked_tilings_in_interpret_mode(rng, config):
  """N = 192 padded to the CTA's 256 or 128-multiple columns (the scale grid too), 150 rows to 256."""
  p = fp8_linear(rng, 192, 256)
  x = jnp.asarray(rng.standard_normal((150, 256)) * rng.uniform(0.1, 10, (150, 1)), jnp.float32)
  got = dense_gemm_fp8(x, p["weight"], p["scale"], jnp.float32, interpret=True, config=config)
  assert got.shape == (150, 192)
  assert rel_err(got, linear(p, x)) < 1e-5


def test_dense_config_stacks_narrow_outputs_and_groups_the_tile_order_for_many_rows():
  assert dense_config(GROUPED_ORDER_FROM - 1, 7168) == default_config(7168)
  assert dense_config(GROUPED_ORDER_FROM, 7168).group_m == GROUPED_ORDER_M > 0
  assert dense_config(4096, 7168) == default_config(7168) and default_config(7168).cta_n == 256
  narrow = dense_config(131072, 640)  # wkv_a's 576 outputs, padded to 128s: 2 warpgroups stacked, 128 x 128
  assert (narrow.block_m, narrow.cta_n, narrow.consumers, narrow.group_m) == (128, 128, 2, GROUPED_ORDER_M)
  assert dense_config(4096, 128).group_m == 0 and dense_config(4096, 128).block_m == 128


def test_dense_fp8_linear_lowers_for_hopper_at_the_671b_shapes():
  """wo over a 128K prefill and wkv_a (576 outputs: padded to 640) at a decode step."""
  cfg = preset("v32-671b")
  f8, s = jnp.float8_e4m3fn, jax.ShapeDtypeStruct
  h = cfg.n_heads * cfg.v_head_dim
  rope = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  for rows, n, k in ((131072, cfg.dim, h), (8, rope, cfg.dim)):
    args = (s((1, rows, k), jnp.bfloat16), s((n, k), f8), s((-(-n // 128), k // 128), jnp.float32))
    run = jax.jit(lambda *a: dense_gemm_fp8(*a, jnp.bfloat16))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_kernel_rejects_bad_operands(rng):
  w, s = fp8_experts(rng, 2, 128, 256)
  xq, xs = quant.act_quant(jnp.ones((128, 256)))
  be = jnp.array([0, 1], jnp.int32)
  with pytest.raises(TypeError, match="e4m3"):
    grouped_gemm_fp8(xq.astype(jnp.bfloat16), xs, (w,), (s,), be)
  with pytest.raises(ValueError, match="block experts"):
    grouped_gemm_fp8(xq[:100], xs[:100], (w,), (s,), be)
  with pytest.raises(ValueError, match="weight scales"):
    grouped_gemm_fp8(xq, xs, (w,), (s[:, :, :1],), be)
  with pytest.raises(ValueError, match="block_m"):
    GroupedGemmConfig(block_m=48)
  with pytest.raises(ValueError, match="block_m"):
    GroupedGemmConfig(block_m=128, consumers=1)
  with pytest.raises(ValueError, match="block_n"):
    GroupedGemmConfig(block_n=192)
  with pytest.raises(ValueError, match="multiple of 256"):
    grouped_gemm_fp8(xq, xs, (w,), (s,), be, GroupedGemmConfig(consumers=2))


def test_default_config_is_warp_specialised_where_n_allows():
  assert default_config(2048).consumers == 2 and default_config(7168).consumers == 2  # the 671B gate/up, down
  assert default_config(384).consumers == 1


def test_align_to_blocks(rng):
  e, n_rows = 16, 230
  sizes = rng.multinomial(200, rng.dirichlet(np.ones(e) * 0.3)).astype(np.int32)  # some experts get no rows
  sizes[3] = 0
  blocks = jax.jit(moe.align_to_blocks, static_argnums=(1, 2))(jnp.asarray(sizes), n_rows, BM)
  source, dest, block_expert = map(np.asarray, blocks)
  m = -(-(n_rows + e * (BM - 1)) // BM) * BM
  assert source.shape == (m,) and dest.shape == (n_rows,) and block_expert.shape == (m // BM,)
  real = np.arange(n_rows) < sizes.sum()
  assert np.all(dest[~real] == m)                                   # rows past the groups go nowhere
  assert len(set(dest[real])) == real.sum() and np.all(source[dest[real]] == np.arange(n_rows)[real])
  assert np.sum(source < n_rows) == real.sum()                      # every other aligned row is padding
  np.testing.assert_array_equal(np.repeat(block_expert, BM)[dest[real]], np.repeat(np.arange(e), sizes))
  np.testing.assert_array_equal(np.bincount(block_expert[block_expert >= 0], minlength=e), -(-sizes // BM))
  used = block_expert >= 0
  assert used[:used.sum()].all() and not used[used.sum():].any()  # used blocks first, in expert order
  assert np.all(np.diff(block_expert[used]) >= 0)


def test_grouped_swiglu_through_the_kernel_with_rows_past_the_groups(tiny_cfg, rng):
  """The expert-parallel contract: rows sorted by expert, a tail of rows no expert owns -> zeros."""
  p = jax.tree.map(lambda a: jnp.asarray(a)[1], init_params(tiny_cfg, seed=6, fp8=True)["moe_layers"])["ffn"]
  sizes = np.array([9, 0, 0, 70, 1] + [0] * (tiny_cfg.n_routed_experts - 5), np.int32)
  rows = jnp.asarray(rng.standard_normal((96, tiny_cfg.dim)), jnp.float32)
  got = moe.grouped_swiglu(p["experts"], rows, jnp.asarray(sizes), "pallas")
  ref = moe.grouped_swiglu(p["experts"], rows, jnp.asarray(sizes), "reference")
  assert rel_err(got[:80], ref[:80]) < 1e-5 and not np.any(np.asarray(got[80:]))


def test_moe_through_the_kernel_equals_the_reference(tiny_cfg, rng):
  """routed_experts with impl="pallas" on the CPU: routing glue + the kernel interpreted, float32."""
  p = jax.tree.map(lambda a: jnp.asarray(a)[1], init_params(tiny_cfg, seed=5, fp8=True)["moe_layers"])["ffn"]
  x = jnp.asarray(rng.standard_normal((1, 37, tiny_cfg.dim)), jnp.float32)
  assert dispatch.fp8_experts_backend("pallas", True, (tiny_cfg.dim, tiny_cfg.moe_inter_dim)) == "interpret"
  got = moe.moe(p, tiny_cfg, x, impl="pallas")
  ref = moe.moe(p, tiny_cfg, x, impl="reference")
  assert rel_err(got, ref) < 1e-5


def test_fp8_experts_backend_choice():
  assert dispatch.fp8_experts_backend("reference", True, (256, 128)) is None
  assert dispatch.fp8_experts_backend("auto", False, (256, 128)) is None
  if not dispatch.on_gpu():
    assert dispatch.fp8_experts_backend("auto", True, (256, 128)) is None
  with pytest.raises(ValueError, match="multiples of 128"):
    dispatch.fp8_experts_backend("pallas", True, (256, 96))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [GroupedGemmConfig(consumers=1), GroupedGemmConfig(consumers=2), STACKED,
                                    GroupedGemmConfig(block_m=128, block_n=128), GroupedGemmConfig(group_m=3)])
def test_kernel_on_gpu(rng, config):
  sizes = [300, 0, 17, 0, 1, 190, 0, 64]
  be = block_layout(sizes, bm=config.block_m)
  m = len(be) * config.block_m
  xq, xs = quant.act_quant(jnp.asarray(rng.standard_normal((m, 512)), jnp.bfloat16))
  weights = [fp8_experts(rng, len(sizes), 512, 512) for _ in range(2)]
  args = (xq, xs, tuple(w for w, _ in weights), tuple(s for _, s in weights), jnp.asarray(be))
  used = int(np.sum(be >= 0)) * config.block_m
  ref = grouped_gemm_fp8_reference(*args, block_m=config.block_m, out_dtype=jnp.float32)[:, :used]
  got = jax.jit(lambda *a: grouped_gemm_fp8(*a, config=config))(*args)[:, :used].astype(jnp.float32)
  assert rel_err(got, ref) < 1e-2  # bf16 output
  exact = jax.jit(lambda *a: grouped_gemm_fp8(*a, config=config, out_dtype=jnp.float32))(*args)[:, :used]
  assert rel_err(exact, ref) < 1e-3  # FP8 tensor cores accumulate in less than float32: 1.3e-4 on H100


@pytest.mark.gpu
def test_moe_layer_with_the_kernel_on_gpu(tiny_cfg, rng):
  p = jax.tree.map(lambda a: jnp.asarray(a)[1], init_params(tiny_cfg, seed=5, fp8=True)["moe_layers"])["ffn"]
  x = jnp.asarray(rng.standard_normal((2, 33, tiny_cfg.dim)), jnp.bfloat16)
  assert dispatch.fp8_experts_backend("auto", True, (tiny_cfg.dim, tiny_cfg.moe_inter_dim)) == "gpu"
  got = jax.jit(lambda p, x: moe.moe(p, tiny_cfg, x))(p, x)
  ref = moe.moe(p, tiny_cfg, x, impl="reference")  # the same bf16 activations: same FP8 roundings
  assert rel_err(got.astype(jnp.float32), ref.astype(jnp.float32)) < 2e-2
  # In float32 the layer differs by more than the GEMM (3e-3 vs 1.3e-4 on H100): the SwiGLU output is
  # re-quantised to e4m3 before the down projection, and the GEMM's differences flip some of its roundings.
  x32 = x.astype(jnp.float32)
  got, ref = jax.jit(lambda p, x: moe.moe(p, tiny_cfg, x))(p, x32), moe.moe(p, tiny_cfg, x32, impl="reference")
  assert rel_err(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [300, GROUPED_ORDER_FROM + 100])  # rows first; the grouped tile order
@pytest.mark.parametrize("n, k", [(576, 7168), (1024, 1536)])  # wkv_a's 576 outputs (padded); a 2-consumer N
def test_dense_fp8_linear_on_gpu(rng, n, k, rows):
  p = fp8_linear(rng, n, k)
  x = jnp.asarray(rng.standard_normal((2, rows, k)), jnp.float32)
  assert dispatch.fp8_linear_backend("auto", True, k, jnp.bfloat16) == "gpu"
  exact = jax.jit(lambda p, x: linear(p, x, impl="pallas"))(p, x)  # forced: "auto" keeps float32 exact
  assert rel_err(exact, linear(p, x)) < 1e-3  # FP8 tensor cores accumulate in less than float32
  xb = x.astype(jnp.bfloat16)
  got = jax.jit(lambda p, x: linear(p, x, impl="auto"))(p, xb).astype(jnp.float32)
  assert rel_err(got, linear(p, xb).astype(jnp.float32)) < 1e-2  # bf16 outputs
