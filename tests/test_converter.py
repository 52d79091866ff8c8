"""The streaming converter: round trip, verify, export, resume after a kill, bad inputs, sharded restore."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from safetensors.numpy import save_file

from convert import orbax_layout
from convert.checkpoint import load_checkpoint
from convert.converter import DONE_FILE, convert_hf_checkpoint, partial_dir_for, read_source
from convert.export import export_checkpoint
from convert.hf_to_params import read_hf_params
from convert.init_random import write_random_checkpoint
from convert.safetensors_io import INDEX_FILE, CheckpointError, ShardedReader
from convert.verify import verify_checkpoint
from dsv32_jax.config import preset
from dsv32_jax.params import init_params
from dsv32_jax.quant import dequant_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = preset("tiny").replace(n_layers=3, n_routed_experts=8, n_expert_groups=4, n_activated_experts=2)
SEED = 9


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return write_random_checkpoint(CFG, tmp_path_factory.mktemp("hf") / "ckpt", seed=SEED, n_shards=3)


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  return convert_hf_checkpoint(hf_dir, tmp_path_factory.mktemp("out") / "ckpt", workers=3, progress=False).path


def bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def trees_bit_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(jax.tree.map(bits_equal, a, b)))


def copy_of(src, tmp_path, name="hf"):
  out = tmp_path / name
  shutil.copytree(src, out)
  return out


def shard_of(d, tensor):
  return ShardedReader(d).weight_map[tensor]


def rewrite_shard(d, file, change):
  """Rewrites one shard through safetensors after `change(dict of its tensors)`."""
  reader = ShardedReader(d)
  tensors = {n: reader.get(n) for n, f in reader.weight_map.items() if f == file}
  change(tensors)
  save_file(tensors, str(d / file), metadata={"format": "pt"})
  index = json.loads((d / INDEX_FILE).read_text())
  index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file} | {n: file for n in tensors}
  (d / INDEX_FILE).write_text(json.dumps(index))


# -- round trip ------------------------------------------------------------------------------------

def test_restores_bit_exact_and_records_the_source(hf_dir, converted):
  cfg, params = load_checkpoint(converted)
  assert cfg == CFG
  assert trees_bit_equal(jax.tree.map(np.asarray, params), init_params(CFG, seed=SEED))
  meta = json.loads((converted / orbax_layout.META_FILE).read_text())
  shards = sorted(ShardedReader(hf_dir).index.files)
  assert sorted(meta["source"]["shards"]) == shards and meta["weights"] == "fp8"
  from convert.safetensors_io import file_sha256
  assert meta["source"]["shards"][shards[0]]["sha256"] == file_sha256(hf_dir / shards[0])
  assert meta["source"]["config"] == json.loads((hf_dir / "config.json").read_text())
  assert "dsv32-jax" in meta["converter"]
  # the layout Orbax writes: zarr3 arrays in one OCDBT database, its metadata files
  params_dir = converted / orbax_layout.PARAMS_DIR
  assert json.loads((params_dir / "_METADATA").read_text())["use_zarr3"] is True
  assert (params_dir / "manifest.ocdbt").exists() and (params_dir / "_CHECKPOINT_METADATA").exists()
  assert not partial_dir_for(converted).exists()


def test_verify_passes_and_export_gives_back_the_source_files(hf_dir, converted, tmp_path):
  report = verify_checkpoint(hf_dir, converted, progress=False)
  assert report.ok, report.problems
  assert report.tensors == len(read_source(hf_dir).plan.jobs)
  export_checkpoint(converted, tmp_path / "exported", progress=False)
  files = sorted(os.listdir(hf_dir))
  assert sorted(os.listdir(tmp_path / "exported")) == files
  for f in files:  # shards, index and config: byte for byte
    assert filecmp.cmp(hf_dir / f, tmp_path / "exported" / f, shallow=False), f
  with pytest.raises(FileExistsError):
    export_checkpoint(converted, tmp_path / "exported", progress=False)


def test_bf16_dequantises_exactly_and_round_trips(hf_dir, tmp_path):
  ckpt = convert_hf_checkpoint(hf_dir, tmp_path / "bf16", weights="bf16", workers=2, progress=False).path
  cfg, params = load_checkpoint(ckpt)
  ref = init_params(CFG, seed=SEED)
  for path in (("moe_layers", "ffn", "experts", "w2"), ("dense_layers", "attn", "wkv_a"), ("mtp", "block", "attn", "wo")):
    ours, theirs = params, ref
    for k in path:
      ours, theirs = ours[k], theirs[k]
    assert "scale" not in ours and ours["weight"].dtype == jnp.bfloat16
    want = dequant_weight(jnp.asarray(theirs["weight"]), jnp.asarray(theirs["scale"]), jnp.bfloat16)
    assert bits_equal(ours["weight"], want), path
  assert bits_equal(params["embed"], ref["embed"])
  assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())
  report = verify_checkpoint(hf_dir, ckpt, progress=False)
  assert report.ok, report.problems
  out = export_checkpoint(ckpt, tmp_path / "exported", progress=False).path
  _, back = read_hf_params(out, progress=False)
  assert trees_bit_equal(back, jax.tree.map(np.asarray, params))


def test_transformers_format_converts_without_mtp(tmp_path):
  from tests.conftest import GOLDEN
  ckpt = convert_hf_checkpoint(f"{GOLDEN}/tiny_a", tmp_path / "ckpt", progress=False).path
  cfg, params = load_checkpoint(ckpt)
  _, ref = read_hf_params(f"{GOLDEN}/tiny_a", progress=False)
  assert cfg.n_mtp_layers == 0 and trees_bit_equal(jax.tree.map(np.asarray, params), ref)
  assert verify_checkpoint(f"{GOLDEN}/tiny_a", ckpt, progress=False).ok
  export_checkpoint(ckpt, tmp_path / "back", progress=False)
  assert filecmp.cmp(f"{GOLDEN}/tiny_a/model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)


# -- verify finds differences ----------------------------------------------------------------------

def test_verify_reports_a_changed_source_and_a_damaged_checkpoint(hf_dir, converted, tmp_path):
  name = "model.layers.2.mlp.experts.5.down_proj.weight"
  src = copy_of(hf_dir, tmp_path)
  file = shard_of(src, name)

  def flip(tensors):
    w = tensors[name].view(np.uint8).copy()
    w[3, 7] ^= 1
    tensors[name] = w.view(ml_dtypes.float8_e4m3fn)
  rewrite_shard(src, file, flip)
  problems = verify_checkpoint(src, converted, progress=False).problems
  assert any(p.startswith(name) and "1 element(s) differ, first at (3, 7)" in p for p in problems), problems
  assert any(file in p and "sha256" in p for p in problems)
  assert len(problems) == 2

  ckpt = copy_of(converted, tmp_path, "ckpt")
  leaf = read_source(hf_dir).plan.leaf(("dense_layers", "attn", "q_norm"))
  store = orbax_layout.open_for_write(ckpt / "params", [leaf], orbax_layout.ts_context())[leaf.path]
  store[0, 5].write(np.asarray(7.0, ml_dtypes.bfloat16)).result()
  problems = list(verify_checkpoint(hf_dir, ckpt, progress=False).problems)
  assert problems == [p for p in problems if "model.layers.0.self_attn.q_a_layernorm.weight" in p] and problems


# -- resume ----------------------------------------------------------------------------------------

KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from convert.converter import convert_hf_checkpoint
    done = 0
    def die_after(name):
      global done
      done += 1
      if done == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-run, with writes in flight
    convert_hf_checkpoint(sys.argv[1], sys.argv[2], workers=3, progress=False, on_tensor_done=die_after)
""")


def run_killed(hf, ckpt, after):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(hf), str(ckpt), str(after)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]


def test_resume_after_a_killed_run_converts_only_the_rest(hf_dir, tmp_path):
  ckpt = tmp_path / "ckpt"
  run_killed(hf_dir, ckpt, after=120)
  partial = partial_dir_for(ckpt)
  assert not ckpt.exists() and partial.exists()
  with pytest.raises(CheckpointError, match="--resume"):
    load_checkpoint(partial)  # an interrupted conversion never loads
  with pytest.raises(FileExistsError, match="--resume"):
    convert_hf_checkpoint(hf_dir, ckpt, progress=False)
  done_before = set((partial / DONE_FILE).read_text().split())
  assert len(done_before) >= 120
  redone = []
  result = convert_hf_checkpoint(hf_dir, ckpt, resume=True, progress=False, on_tensor_done=redone.append)
  jobs = read_source(hf_dir).plan.jobs
  assert not set(redone) & done_before and len(redone) + len(done_before) == len(jobs)
  assert result.skipped == len(done_before) and not partial.exists()
  _, params = load_checkpoint(ckpt)
  assert trees_bit_equal(jax.tree.map(np.asarray, params), init_params(CFG, seed=SEED))
  assert verify_checkpoint(hf_dir, ckpt, progress=False).ok


def test_resume_redoes_a_changed_shard_and_refuses_other_flags(hf_dir, tmp_path):
  src = copy_of(hf_dir, tmp_path)
  ckpt = tmp_path / "ckpt"
  run_killed(src, ckpt, after=250)
  done_before = set((partial_dir_for(ckpt) / DONE_FILE).read_text().split())
  with pytest.raises(CheckpointError, match="different weights"):
    convert_hf_checkpoint(src, ckpt, weights="bf16", resume=True, progress=False)
  weight_map = ShardedReader(src).weight_map
  touched = weight_map[sorted(done_before)[0]]
  os.utime(src / touched, ns=(1, 1))  # looks re-downloaded
  redone = []
  convert_hf_checkpoint(src, ckpt, resume=True, progress=False, on_tensor_done=redone.append)
  in_touched = {n for n in done_before if weight_map[n] == touched}
  assert in_touched and in_touched <= set(redone) and not set(redone) & (done_before - in_touched)
  assert verify_checkpoint(src, ckpt, progress=False).ok


# -- bad inputs ------------------------------------------------------------------------------------

def set_index(d, change):
  index = json.loads((d / INDEX_FILE).read_text())
  change(index["weight_map"])
  (d / INDEX_FILE).write_text(json.dumps(index))


def set_config(d, **fields):
  hf = json.loads((d / "config.json").read_text())
  hf.update(fields)
  (d / "config.json").write_text(json.dumps(hf))


def truncate(path, keep):
  data = path.read_bytes()
  path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


NORM = "model.layers.1.input_layernorm.weight"
BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"

BAD_SOURCES = {
    "missing shard": (lambda d: (d / shard_of(d, EXPERT)).unlink(), ["missing", "model-0000"]),
    "truncated shard": (lambda d: truncate(d / shard_of(d, EXPERT), -100), ["truncated or corrupt", "model-0000"]),
    "corrupt header": (lambda d: (d / shard_of(d, EXPERT)).write_bytes(b"\xff" * 64), ["truncated or corrupt"]),
    "missing tensor": (lambda d: rewrite_shard(d, shard_of(d, EXPERT), lambda t: t.pop(EXPERT)), [EXPERT, "missing"]),
    "unknown tensor": (lambda d: rewrite_shard(d, shard_of(d, NORM), lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})), ["rotary_emb.inv_freq"]),
    "wrong dtype": (lambda d: rewrite_shard(d, shard_of(d, BIAS), lambda t: t.update(
        {BIAS: t[BIAS].astype(np.int32)})), [BIAS, "int32"]),
    "fp8 where the release has float": (lambda d: rewrite_shard(d, shard_of(d, NORM), lambda t: t.update(
        {NORM: t[NORM].astype(ml_dtypes.float8_e4m3fn)})), [NORM, "float8_e4m3fn"]),
    "mixed dtypes": (lambda d: rewrite_shard(d, shard_of(d, NORM), lambda t: t.update(
        {NORM: t[NORM].astype(np.float32)})), [NORM, "mix dtypes"]),
    "wrong shape": (lambda d: rewrite_shard(d, shard_of(d, NORM), lambda t: t.update({NORM: t[NORM][:100]})),
                    [NORM, "(100,)", "(256,)"]),
    "weight without scale": (lambda d: rewrite_shard(d, shard_of(d, EXPERT + "_scale_inv"), lambda t: t.pop(
        EXPERT + "_scale_inv")), [EXPERT, "block scale"]),
    "index names the wrong shard": (lambda d: set_index(d, lambda m: m.update(
        {EXPERT: next(f for f in sorted(set(m.values())) if f != m[EXPERT])})), [EXPERT, "does not list"]),
    "config with more layers": (lambda d: set_config(d, num_hidden_layers=4), ["model.layers.3.", "not part of"]),
    "config with other widths": (lambda d: set_config(d, moe_intermediate_size=256), ["(256, 256)", "config.json"]),
    "config that is not V3.2": (lambda d: set_config(d, model_type="llama"), ["model_type"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_named_and_nothing_is_written(hf_dir, tmp_path, case):
  from dsv32_jax.config import ConfigError
  mutate, expected = BAD_SOURCES[case]
  src = copy_of(hf_dir, tmp_path)
  mutate(src)
  with pytest.raises((CheckpointError, ConfigError)) as info:
    convert_hf_checkpoint(src, tmp_path / "ckpt", progress=False)
  for text in expected:
    assert text in str(info.value), (case, str(info.value))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing at or beside the final path


@pytest.mark.parametrize("case", ["bad scale", "mtp copy differs"])
def test_bad_values_found_while_streaming(hf_dir, tmp_path, case):
  src = copy_of(hf_dir, tmp_path)
  if case == "bad scale":
    name = "model.layers.2.mlp.experts.6.gate_proj.weight_scale_inv"
    rewrite_shard(src, shard_of(src, name), lambda t: t[name].__setitem__((0, 1), np.nan))
  else:
    name = "model.layers.3.shared_head.head.weight"
    rewrite_shard(src, shard_of(src, name), lambda t: t.update({name: t[name][::-1].copy()}))
  with pytest.raises(CheckpointError) as info:
    convert_hf_checkpoint(src, tmp_path / "ckpt", progress=False)
  assert name in str(info.value) and "--resume" in str(info.value)
  assert not (tmp_path / "ckpt").exists()


# -- sharded restore -------------------------------------------------------------------------------

MESH_CHILD = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from convert.checkpoint import abstract_params, load_checkpoint
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def spec_for(shape):  # 'model' on the last axis divisible by 4, 'data' on another divisible by 2
      axes = [None] * len(shape)
      for name, n in (("model", 4), ("data", 2)):
        for i in reversed(range(len(shape))):
          if axes[i] is None and shape[i] % n == 0 and shape[i] >= n:
            axes[i] = name
            break
      return P(*axes)

    template = abstract_params(sys.argv[1])
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec_for(a.shape)), template)
    _, single = load_checkpoint(sys.argv[1])
    _, sharded = load_checkpoint(sys.argv[1], shardings)
    n = split = 0
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(single), jax.tree.leaves(sharded),
                               jax.tree.leaves(shardings)):
      assert b.sharding == s, path
      assert len(b.addressable_shards) == 8
      for shard in b.addressable_shards:
        assert shard.data.shape == s.shard_shape(a.shape), path
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), path
      n += 1
      split += any(spec is not None for spec in s.spec)
    print("OK", n, split)
""")


def test_restore_into_an_8_device_mesh_equals_single_device(converted):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", MESH_CHILD, str(converted)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, n, split = proc.stdout.split()
  assert int(n) > 100 and int(split) > int(n) // 2


def test_plan_of_the_671b_release_from_its_headers():
  """Every name of the released checkpoint (MTP layer 61, indexer, 256 experts x 58 layers) maps, from
  headers alone; the stacked experts show why conversion must write slice by slice."""
  from convert.init_random import release_tensor_specs
  from convert.plan import plan_conversion
  from convert.safetensors_io import TensorHeader
  cfg = preset("v32-671b")
  headers = {n: TensorHeader(n, "model-00001-of-00163.safetensors", s, d) for n, s, d in release_tensor_specs(cfg)}
  assert len(headers) == 92425 and 689e9 < sum(h.nbytes for h in headers.values()) < 690e9
  plan = plan_conversion(cfg, headers, "fp8")
  assert len(plan.jobs) + len(plan.copy_checks) == len(headers) and not plan.dropped_mtp
  experts = plan.leaf(("moe_layers", "ffn", "experts", "w1", "weight"))
  assert experts.shape == (58, 256, 2048, 7168) and experts.slice_shape == (1, 1, 2048, 7168)
  assert plan.leaf(("mtp", "block", "attn", "indexer", "wq_b", "scale")).shape == (1, 64, 12)
  assert plan.largest_slice_bytes == 129280 * 7168 * 2
