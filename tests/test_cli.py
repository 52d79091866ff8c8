"""The dsv32 command line, run as a user runs it: in subprocesses."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.checkpoint import load_checkpoint
from dsv32_jax import cache as cache_lib
from dsv32_jax import model
from dsv32_jax.options import RunOptions
from tests.conftest import GOLDEN, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dsv32(*args, ok=True):
  exe = shutil.which("dsv32")
  cmd = [exe] if exe else [sys.executable, "-m", "dsv32_jax.cli"]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  dsv32("init-random", "--preset", "tiny", "--seed", 7, root / "hf")
  assert (root / "hf" / "model.safetensors.index.json").exists()
  out = dsv32("convert", root / "hf", root / "ckpt")
  assert "converted" in out.stdout
  return root


@pytest.mark.slow
def test_init_random_convert_logits(converted, rng):
  cfg, params = load_checkpoint(converted / "ckpt")
  tokens = rng.integers(0, cfg.vocab_size, (2, 45)).astype(np.int32)  # 45 > index_topk = 32
  np.save(converted / "tokens.npy", tokens)
  dsv32("logits", converted / "ckpt", "--tokens", converted / "tokens.npy", "--out", converted / "logits.npy",
        "--dtype", "float32")
  got = np.load(converted / "logits.npy")
  assert got.shape == (2, 45, cfg.vocab_size) and got.dtype == np.float32
  opts = RunOptions(dtype="float32")
  cache = cache_lib.init_cache(cfg, cfg.n_layers, 2, 45, jnp.float32)
  hidden, _ = jax.jit(lambda p, t, c: model.forward(p, cfg, opts, t, jnp.zeros(2, jnp.int32), c, kv_len=45))(
      params, jnp.asarray(tokens), cache)
  assert rel_err(got, model.logits(params, hidden)) < 1e-5


@pytest.mark.slow
def test_gathered_prefill_form_through_the_cli(tmp_path, rng):
  """--prefill-form gathered (MLA in the latent over the gathered top-k rows: the sparse MLA kernels'
  form) gives the official form's logits. Checked exactly: bf16 weights, no FP8 simulations (with FP8
  weights every linear re-quantises its input to e4m3, and 1e-7 differences flip roundings)."""
  dsv32("init-random", "--preset", "tiny", "--seed", 3, "--bf16", tmp_path / "hf")
  dsv32("convert", tmp_path / "hf", tmp_path / "ckpt", "--weights", "bf16", "--quiet")
  cfg, _ = load_checkpoint(tmp_path / "ckpt")
  np.save(tmp_path / "tokens.npy", rng.integers(0, cfg.vocab_size, (2, 45)).astype(np.int32))  # 45 > index_topk
  exact = ("--dtype", "float32", "--indexer-quant", "none", "--latent-quant", "none")
  for form in ("official", "gathered"):
    dsv32("logits", tmp_path / "ckpt", "--tokens", tmp_path / "tokens.npy", "--out", tmp_path / f"{form}.npy",
          *exact, "--prefill-form", form)
  assert rel_err(np.load(tmp_path / "gathered.npy"), np.load(tmp_path / "official.npy")) < 1e-5


@pytest.mark.slow
def test_generate_prints_tokens_and_speed(converted):
  out = dsv32("generate", converted / "ckpt", "--prompt-tokens", ",".join(map(str, range(2, 40))),
              "--prompt-tokens", "5,6,7", "--max-new-tokens", 5)
  lines = out.stdout.splitlines()
  assert lines[0].startswith("sequence 0: ") and len(lines[0].split(": ")[1].split(",")) <= 5
  assert any(line.startswith("decode:") and "tokens/s" in line for line in lines)
  bad = dsv32("generate", converted / "ckpt", "--prompt-tokens", "1,99999", ok=False)
  assert bad.returncode != 0 and "outside the vocabulary" in bad.stderr
  # the e4m3 latent cache holds the same values: the same greedy tokens
  fp8 = dsv32("generate", converted / "ckpt", "--prompt-tokens", ",".join(map(str, range(2, 40))),
              "--prompt-tokens", "5,6,7", "--max-new-tokens", 5, "--fp8-cache")
  assert [ln for ln in fp8.stdout.splitlines() if ln.startswith("sequence")] == \
      [ln for ln in lines if ln.startswith("sequence")]
  bad = dsv32("generate", converted / "ckpt", "--prompt-tokens", "5,6", "--fp8-cache", "--latent-quant", "none",
              ok=False)
  assert bad.returncode != 0 and "latent_quant" in bad.stderr


@pytest.mark.slow
def test_transformers_checkpoint_through_the_cli(tmp_path):
  dsv32("convert", f"{GOLDEN}/tiny_b", tmp_path / "ckpt")
  dsv32("logits", tmp_path / "ckpt", "--tokens", f"{GOLDEN}/tiny_b/tokens.npy", "--out", tmp_path / "l.npy",
        "--dtype", "float32", "--indexer-quant", "none", "--latent-quant", "none")
  assert rel_err(np.load(tmp_path / "l.npy"), np.load(f"{GOLDEN}/tiny_b/logits.npy")) < 1e-4


def test_clear_errors(tmp_path):
  out = dsv32("convert", tmp_path / "nothing", tmp_path / "ckpt", ok=False)
  assert out.returncode != 0 and "nothing: neither model.safetensors.index.json" in out.stderr
  out = dsv32("logits", tmp_path, "--tokens", "t.npy", "--out", "o.npy", "--indexer-quant", "int4", ok=False)
  assert out.returncode != 0 and "expected 'fp8' or 'none'" in out.stderr


def test_verify_and_export_through_the_cli(converted, tmp_path):
  import filecmp
  out = dsv32("verify", converted / "hf", converted / "ckpt", "--quiet")
  assert out.stdout.startswith("verified") and "all identical" in out.stdout
  out = dsv32("export", converted / "ckpt", tmp_path / "back", "--quiet")
  assert "exported" in out.stdout
  shards = sorted(p.name for p in (converted / "hf").glob("*.safetensors"))
  assert shards and all(filecmp.cmp(converted / "hf" / f, tmp_path / "back" / f, shallow=False) for f in shards)
  # a source that no longer matches: every difference listed, exit status 1
  changed = tmp_path / "changed"
  shutil.copytree(converted / "hf", changed)
  with open(changed / shards[-1], "r+b") as f:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  out = dsv32("verify", changed, converted / "ckpt", "--quiet", ok=False)
  assert out.returncode == 1 and "problem(s)" in out.stderr and "sha256" in out.stdout and "differ" in out.stdout


def test_convert_help_and_refusals(converted, tmp_path):
  out = dsv32("convert", "--help")
  for text in ("--resume", "--workers N", "--weights {fp8,bf16}", "CKPT_DIR.partial", "dsv32 verify"):
    assert text in out.stdout
  (tmp_path / "ckpt.partial").mkdir()
  out = dsv32("convert", converted / "hf", tmp_path / "ckpt", ok=False)
  assert out.returncode != 0 and "--resume" in out.stderr
  out = dsv32("convert", converted / "hf", converted / "ckpt", ok=False)
  assert out.returncode != 0 and "already exists" in out.stderr
