"""The ``dsv32`` command line: make a random release-format checkpoint, convert, score, generate, demo."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = """\
DeepSeek-V3.2 in JAX. Typical use:
  dsv32 convert /models/DeepSeek-V3.2 /ckpt/v32      # the HF release (FP8 safetensors) -> Orbax
  dsv32 generate /ckpt/v32 --prompt-tokens 0,1234,567 --max-new-tokens 32
  dsv32 demo                                         # everything above on a tiny random model
"""


def _quant_flag(value: str) -> bool:
  if value not in ("fp8", "none"):
    raise argparse.ArgumentTypeError(f"expected 'fp8' or 'none', got {value!r}")
  return value == "fp8"


def _token_list(value: str) -> list[int]:
  try:
    tokens = [int(t) for t in value.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--prompt-tokens wants comma-separated integers, got {value!r}") from None
  if not tokens:
    raise argparse.ArgumentTypeError("--prompt-tokens is empty")
  return tokens


def _add_run_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help="activation and cache dtype (default bfloat16, as released)")
  p.add_argument("--indexer-quant", type=_quant_flag, default=True, metavar="{fp8,none}",
                 help="lightning indexer in FP8 with the Hadamard rotation (fp8, default, as released) or unquantised")
  p.add_argument("--latent-quant", type=_quant_flag, default=True, metavar="{fp8,none}",
                 help="round the cached MLA latent through FP8 as the official code does (default fp8)")
  p.add_argument("--kernels", choices=["auto", "reference", "pallas"], default="auto",
                 help="Pallas kernels where the backend has them (auto), or the plain-JAX reference")


def _run_options(args):
  import jax

  from dsv32_jax.options import RunOptions
  if args.dtype == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
  return RunOptions(dtype=args.dtype, indexer_quant=args.indexer_quant, latent_quant=args.latent_quant,
                    kernels=args.kernels)


def cmd_init_random(args) -> None:
  from convert.init_random import write_random_checkpoint
  from dsv32_jax.config import preset
  out = Path(args.out_hf_dir)
  if out.exists() and any(out.iterdir()):
    sys.exit(f"dsv32 init-random: {out} exists and is not empty")
  cfg = preset(args.preset)
  write_random_checkpoint(cfg, out, seed=args.seed, fp8=not args.bf16, n_shards=args.shards)
  print(f"wrote a random '{args.preset}' checkpoint in the release format to {out}")


def cmd_convert(args) -> None:
  from convert.checkpoint import convert_hf_checkpoint
  t0 = time.perf_counter()
  out = convert_hf_checkpoint(args.hf_dir, args.ckpt_dir, weights=args.weights)
  print(f"converted {args.hf_dir} -> {out} in {time.perf_counter() - t0:.1f} s")


def cmd_logits(args) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from convert.checkpoint import load_checkpoint
  from dsv32_jax import cache as cache_lib
  from dsv32_jax import model

  opts = _run_options(args)
  tokens = np.load(args.tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    sys.exit(f"dsv32 logits: {args.tokens} holds {tokens.dtype} {tokens.shape}; expected integer [batch, seq]")
  cfg, params = load_checkpoint(args.ckpt_dir)
  if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
    sys.exit(f"dsv32 logits: {args.tokens} has token ids outside [0, {cfg.vocab_size})")
  if tokens.shape[1] > cfg.max_seq_len:
    sys.exit(f"dsv32 logits: {tokens.shape[1]} tokens exceed max_position_embeddings = {cfg.max_seq_len}")
  b, s = tokens.shape
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, s, opts.jnp_dtype, opts.indexer_quant)

  @jax.jit
  def run(params, tokens, cache):
    hidden, _ = model.forward(params, cfg, opts, tokens, jnp.zeros(b, jnp.int32), cache, kv_len=s)
    return model.logits(params, hidden)

  logits = np.asarray(run(params, jnp.asarray(tokens, jnp.int32), cache), np.float32)
  np.save(args.out, logits)
  print(f"wrote float32 logits {logits.shape} to {args.out}")


def _generate(ckpt_dir, prompts, args):
  from convert.checkpoint import load_checkpoint
  from dsv32_jax.generate import generate
  from dsv32_jax.sampling import SamplingParams
  opts = _run_options(args)
  cfg, params = load_checkpoint(ckpt_dir)
  result = generate(params, cfg, opts, prompts, args.max_new_tokens,
                    SamplingParams(temperature=args.temperature, top_p=args.top_p), seed=args.seed)
  for i, row in enumerate(result.tokens):
    print(f"sequence {i}: {','.join(map(str, row))}")
  print(f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms = "
        f"{result.prefill_tokens_per_second:.1f} tokens/s")
  print(f"decode: {len(result.tokens)} x {result.decode_steps} steps in {result.decode_seconds * 1e3:.1f} ms = "
        f"{result.decode_tokens_per_second:.1f} tokens/s  (compile {result.compile_seconds:.1f} s, not counted)")
  return result


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
  p.add_argument("--max-new-tokens", type=int, default=max_new)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)


def cmd_generate(args) -> None:
  from dsv32_jax.generate import GenerationError
  try:
    _generate(args.ckpt_dir, args.prompt_tokens, args)
  except GenerationError as e:
    sys.exit(f"dsv32 generate: {e}")


def cmd_demo(args) -> None:
  """init-random (tiny, release format) -> convert -> generate with DSA prefill + decode."""
  import numpy as np

  from convert.checkpoint import convert_hf_checkpoint
  from convert.init_random import write_random_checkpoint
  from dsv32_jax.config import preset
  cfg = preset("tiny")
  work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dsv32-demo-"))
  hf_dir, ckpt_dir = work / "hf", work / "ckpt"
  if hf_dir.exists() or ckpt_dir.exists():
    sys.exit(f"dsv32 demo: {work} already holds hf/ or ckpt/; pass an empty --workdir")
  print(f"1/3 random tiny checkpoint in the release format (FP8 e4m3 + 128x128 scales) -> {hf_dir}")
  write_random_checkpoint(cfg, hf_dir, seed=args.seed)
  print(f"2/3 convert -> {ckpt_dir}")
  convert_hf_checkpoint(hf_dir, ckpt_dir)
  rng = np.random.default_rng(args.seed)
  lengths = [3 * cfg.index_topk, 2 * cfg.index_topk + 5]  # longer than index_topk: the indexer selects
  prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in lengths]
  print(f"3/3 generate: {len(prompts)} prompts of {lengths} tokens (index_topk = {cfg.index_topk}), "
        f"{args.max_new_tokens} new tokens each")
  _generate(ckpt_dir, prompts, args)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="dsv32", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("init-random", help="write a random checkpoint in the exact HF release format")
  p.add_argument("out_hf_dir")
  p.add_argument("--preset", default="tiny", help="model preset: tiny or v32-671b (default tiny)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shards", type=int, default=4, help="about how many safetensors shards to write")
  p.add_argument("--bf16", action="store_true", help="bf16 linear weights instead of FP8 + block scales")
  p.set_defaults(fn=cmd_init_random)

  p = sub.add_parser("convert", help="HF safetensors (FP8 release or save_pretrained float) -> Orbax checkpoint")
  p.add_argument("hf_dir")
  p.add_argument("ckpt_dir")
  p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8",
                 help="keep FP8 weights with their block scales (default) or dequantise to bf16")
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("logits", help="float32 logits of every position for a batch of token ids")
  p.add_argument("ckpt_dir")
  p.add_argument("--tokens", required=True, help=".npy of integer token ids [batch, seq]")
  p.add_argument("--out", required=True, help=".npy to write float32 [batch, seq, vocab]")
  _add_run_options(p)
  p.set_defaults(fn=cmd_logits)

  p = sub.add_parser("generate", help="generate tokens after one or more prompts (DSA prefill + decode)")
  p.add_argument("ckpt_dir")
  p.add_argument("--prompt-tokens", type=_token_list, action="append", required=True,
                 help="comma-separated token ids; repeat for a batch of prompts")
  _add_sampling(p, 16)
  _add_run_options(p)
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("demo", help="random tiny checkpoint -> convert -> generate, printing tokens/s")
  p.add_argument("--workdir", help="where to write hf/ and ckpt/ (default: a new temporary directory)")
  _add_sampling(p, 64)
  _add_run_options(p)
  p.set_defaults(fn=cmd_demo)

  args = parser.parse_args(argv)
  from convert.safetensors_io import CheckpointError
  from dsv32_jax.config import ConfigError
  try:
    args.fn(args)
  except (CheckpointError, ConfigError, FileExistsError) as e:
    sys.exit(f"dsv32 {args.command}: {e}")


if __name__ == "__main__":
  main()
