"""Release-format checkpoints: random init, HF <-> pytree mapping, Orbax round trip, clear errors."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.checkpoint import convert_hf_checkpoint, load_checkpoint
from convert.hf_layout import hf_name_grid
from convert.hf_to_params import hf_tensors, read_hf_params
from convert.init_random import write_random_checkpoint
from convert.safetensors_io import INDEX_FILE, CheckpointError, ShardedReader
from dsv32_jax.config import ModelConfig, preset
from dsv32_jax.params import init_params
from tests.conftest import GOLDEN

CFG = preset("tiny").replace(n_layers=3, n_routed_experts=8, n_expert_groups=4, n_activated_experts=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return write_random_checkpoint(CFG, tmp_path_factory.mktemp("hf") / "ckpt", seed=5, n_shards=3)


def shard_files(d):
  return sorted(set(ShardedReader(d).weight_map.values()))


def copy_of(hf_dir, tmp_path):
  out = tmp_path / "hf"
  shutil.copytree(hf_dir, out)
  return out


def leaves_equal(a, b):
  eq = jax.tree.map(lambda x, y: x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
      np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), a, b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(eq))


def test_random_checkpoint_has_the_release_layout(hf_dir):
  reader = ShardedReader(hf_dir)
  assert len(set(reader.weight_map.values())) >= 3
  hf = json.loads((hf_dir / "config.json").read_text())
  assert hf["quantization_config"]["weight_block_size"] == [128, 128] and "rope_scaling" in hf
  shape, dtype = reader.shape_dtype("model.layers.1.mlp.experts.7.down_proj.weight")
  assert shape == (CFG.dim, CFG.moe_inter_dim) and dtype == "F8_E4M3"
  assert reader.shape_dtype("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv") == ((2, 2), "F32")
  assert reader.shape_dtype("model.layers.2.mlp.gate.e_score_correction_bias")[1] == "F32"
  assert reader.shape_dtype("model.layers.0.self_attn.indexer.weights_proj.weight")[1] == "BF16"
  for name in ("model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.shared_head.head.weight",
               "model.layers.3.embed_tokens.weight", "model.layers.3.self_attn.indexer.wk.weight"):
    assert name in reader  # the MTP layer, as layer n_layers
  scale = reader.get("model.layers.0.self_attn.o_proj.weight_scale_inv")
  assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # ue8m0


def test_read_back_bit_exact(hf_dir):
  cfg, params = read_hf_params(hf_dir, progress=False)
  assert cfg == CFG
  assert leaves_equal(params, init_params(CFG, seed=5, fp8=True))
  assert params["moe_layers"]["ffn"]["experts"]["w1"]["weight"].shape == (2, 8, CFG.moe_inter_dim, CFG.dim)


def test_export_round_trip_is_bit_identical(hf_dir):
  reader = ShardedReader(hf_dir)
  cfg, params = read_hf_params(hf_dir, progress=False)
  exported = dict(hf_tensors(cfg, params))
  assert sorted(exported) == sorted(reader.names())
  for name, array in exported.items():
    src = reader.get(name)
    assert src.dtype == array.dtype and np.array_equal(src.view(np.uint8), array.view(np.uint8)), name


def test_bf16_mode_dequantises(hf_dir):
  _, fp8 = read_hf_params(hf_dir, progress=False)
  _, bf16 = read_hf_params(hf_dir, weights="bf16", progress=False)
  wq = fp8["dense_layers"]["attn"]["wq_b"]
  deq = bf16["dense_layers"]["attn"]["wq_b"]
  assert "scale" not in deq and deq["weight"].dtype == ml_dtypes.bfloat16
  expected = wq["weight"][0, :128, :128].astype(np.float32) * wq["scale"][0, 0, 0]
  np.testing.assert_array_equal(deq["weight"][0, :128, :128].astype(np.float32), expected)


def test_orbax_round_trip_and_atomic_final_path(hf_dir, tmp_path):
  ckpt = convert_hf_checkpoint(hf_dir, tmp_path / "ckpt", progress=False).path
  cfg, params = load_checkpoint(ckpt)
  assert cfg == CFG
  assert leaves_equal(jax.tree.map(np.asarray, params), init_params(CFG, seed=5))
  with pytest.raises(FileExistsError):
    convert_hf_checkpoint(hf_dir, ckpt, progress=False)
  bad = copy_of(hf_dir, tmp_path)
  (bad / shard_files(bad)[1]).write_bytes(b"\0" * 100)
  with pytest.raises(CheckpointError):
    convert_hf_checkpoint(bad, tmp_path / "never", progress=False)
  assert not any(p.name.startswith("never") for p in tmp_path.iterdir())  # nothing at (or beside) the final path


def test_transformers_save_pretrained_format():
  """Plain float32 safetensors without MTP tensors (transformers drops them): read as a model without MTP."""
  cfg, params = read_hf_params(f"{GOLDEN}/tiny_a", progress=False)
  assert cfg.n_mtp_layers == 0 and "mtp" not in params
  assert params["head"].dtype == np.float32 and "scale" not in params["moe_layers"]["attn"]["wo"]


def error_for(tmp_path, hf_dir, mutate):
  d = copy_of(hf_dir, tmp_path)
  mutate(d)
  with pytest.raises(CheckpointError) as info:
    read_hf_params(d, progress=False)
  return str(info.value)


def test_missing_shard(hf_dir, tmp_path):
  first = shard_files(hf_dir)[0]
  msg = error_for(tmp_path, hf_dir, lambda d: (d / first).unlink())
  assert first in msg and "missing" in msg


def test_truncated_shard(hf_dir, tmp_path):
  last = shard_files(hf_dir)[-1]

  def truncate(d):
    f = d / last
    f.write_bytes(f.read_bytes()[:5000])
  assert last in error_for(tmp_path, hf_dir, truncate)


def test_missing_tensor(hf_dir, tmp_path):
  def drop(d):
    index = json.loads((d / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (d / INDEX_FILE).write_text(json.dumps(index))
  assert "model.layers.1.mlp.experts.3.up_proj.weight" in error_for(tmp_path, hf_dir, drop)


def test_unknown_tensor(hf_dir, tmp_path):
  def add(d):
    save_file({"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}, str(d / "extra.safetensors"))
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary.inv_freq"] = "extra.safetensors"
    (d / INDEX_FILE).write_text(json.dumps(index))
  assert "rotary.inv_freq" in error_for(tmp_path, hf_dir, add)


def test_config_that_does_not_match_the_weights(hf_dir, tmp_path):
  def widen(d):
    hf = json.loads((d / "config.json").read_text())
    hf["moe_intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(hf))
  msg = error_for(tmp_path, hf_dir, widen)
  assert "mlp.experts.0.gate_proj.weight" in msg and "(256, 256)" in msg


def test_fp8_weight_without_scale(hf_dir, tmp_path):
  def drop_scale(d):
    index = json.loads((d / INDEX_FILE).read_text())
    del index["weight_map"]["lm_head.weight"]  # keep the checkpoint otherwise complete
    for n in [n for n in index["weight_map"] if n.startswith("model.layers.0.self_attn.o_proj.weight_scale")]:
      del index["weight_map"][n]
    (d / INDEX_FILE).write_text(json.dumps(index))
  msg = error_for(tmp_path, hf_dir, drop_scale)
  assert "lm_head.weight" in msg or "o_proj" in msg


def test_name_grid_covers_layers_and_experts():
  grid = hf_name_grid(CFG, ("moe_layers", "ffn", "experts", "w2", "scale"))
  assert grid.shape == (2, 8) and grid[1, 7] == "model.layers.2.mlp.experts.7.down_proj.weight_scale_inv"
  assert hf_name_grid(CFG, ("mtp", "norm")).tolist() == ["model.layers.3.shared_head.norm.weight"]
  assert hf_name_grid(CFG, ("moe_layers", "ffn", "gate", "bias"))[0] == "model.layers.1.mlp.gate.e_score_correction_bias"
  with pytest.raises(KeyError):
    hf_name_grid(CFG, ("moe_layers", "ffn", "router"))


def test_config_round_trip_preserves_671b():
  assert ModelConfig.from_hf_dict(preset("v32-671b").to_hf_dict()) == preset("v32-671b")
