"""The ``dsv32`` command line: make a random release-format checkpoint, convert (verify, export), score,
generate, demo."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

DESCRIPTION = """\
DeepSeek-V3.2 in JAX. Typical use:
  dsv32 convert /models/DeepSeek-V3.2 /ckpt/v32      # the HF release (FP8 safetensors) -> Orbax
  dsv32 verify /models/DeepSeek-V3.2 /ckpt/v32       # every tensor checked against the source
  dsv32 generate /ckpt/v32 --prompt-tokens 0,1234,567 --max-new-tokens 32
  dsv32 demo                                         # everything above on a tiny random model
"""

CONVERT_HELP = """\
Convert a Hugging Face DeepSeek-V3.2 checkpoint -- the FP8 release (model-*.safetensors with
model.safetensors.index.json and config.json) or a transformers save_pretrained directory -- into a
dsv32-jax checkpoint: an Orbax checkpoint (OCDBT + zarr3) that `dsv32 generate`, `dsv32 logits` and
convert.checkpoint.load_checkpoint restore onto one device or any sharding.

Every tensor's name, shape and dtype is checked against config.json before anything is written.
Tensors are streamed one at a time: memory stays at a few times the largest tensor (the 671B release
converts on a host with far less RAM than its 690 GB), and the output needs about as much disk as the
source. The result appears at CKPT_DIR only when complete; until then it is built in CKPT_DIR.partial,
which an interrupted run leaves behind: rerun with --resume to continue where it stopped.

example:
  dsv32 convert /models/DeepSeek-V3.2 /ckpt/v32
  dsv32 convert /models/DeepSeek-V3.2 /ckpt/v32 --resume      # after an interruption
  dsv32 verify /models/DeepSeek-V3.2 /ckpt/v32                # optional: compare every tensor
"""

VERIFY_HELP = """\
Check a converted checkpoint against its source, tensor by tensor: bit-identical FP8 weights, block
scales and float tensors (or, for --weights bf16 checkpoints, bit-exact dequantisation), the arrays'
shapes and dtypes, config.json, and each source shard's sha256 against the one recorded at conversion.
Exits 0 when everything matches; otherwise lists every difference and exits 1.
"""

EXPORT_HELP = """\
Write a dsv32-jax checkpoint back in the Hugging Face release format: the same tensor names in the
same shard files, model.safetensors.index.json and config.json. A checkpoint converted with the default
--weights fp8 exports to the source's bytes exactly. HF_DIR must not exist.
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
  p.add_argument("--fp8-cache", action="store_true",
                 help="cache the MLA latent as e4m3 + a scale per 128 values (FlashMLA's 656 bytes a token): "
                      "the same values as the default bf16 cache in 57%% of its bytes; needs --latent-quant fp8")
  p.add_argument("--kernels", choices=["auto", "reference", "pallas"], default="auto",
                 help="Pallas kernels where the backend has them (auto), or the plain-JAX reference")
  p.add_argument("--prefill-form", choices=["auto", "official", "gathered"], default="auto",
                 help="prefill attention: the official MHA form with the top-k as a score mask (on a GPU through "
                      "cuDNN), or MLA in the latent over each query's gathered top-k rows -- the sparse MLA "
                      "kernels, what a long prompt wants on a GPU (the same attention up to rounding); auto "
                      "(default): official up to 4096 keys, gathered beyond where the DSA kernels run")


def _run_options(args):
  import jax

  from dsv32_jax.options import RunOptions
  if args.dtype == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
  opts = RunOptions(dtype=args.dtype, indexer_quant=args.indexer_quant, latent_quant=args.latent_quant,
                    fp8_latent_cache=args.fp8_cache, kernels=args.kernels)
  if args.prefill_form == "gathered":
    opts = opts.replace(prefill_attention="absorbed", prefill_selection="gather")
  elif args.prefill_form == "official":
    opts = opts.replace(gathered_prefill_from=None)
  return opts


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
  from convert.converter import convert_hf_checkpoint
  try:
    r = convert_hf_checkpoint(args.hf_dir, args.ckpt_dir, weights=args.weights, workers=args.workers,
                              resume=args.resume, progress=not args.quiet)
  except KeyboardInterrupt:
    sys.exit(f"dsv32 convert: interrupted; what is done is kept in {args.ckpt_dir}.partial -- "
             "rerun the same command with --resume to continue")
  resumed = f" (resumed: {r.skipped} tensors were already done)" if r.skipped else ""
  print(f"converted {args.hf_dir} -> {r.path}: {r.tensors} tensors, {r.bytes_read / 1e9:.2f} GB in {r.seconds:.1f} s "
        f"= {r.gb_per_s:.2f} GB/s{resumed}")


def cmd_verify(args) -> None:
  from convert.verify import verify_checkpoint
  r = verify_checkpoint(args.hf_dir, args.ckpt_dir, workers=args.workers, progress=not args.quiet)
  if not r.ok:
    for line in r.problems:
      print(line)
    sys.exit(f"dsv32 verify: {len(r.problems)} problem(s): {args.ckpt_dir} does not match {args.hf_dir}")
  print(f"verified {args.ckpt_dir} against {args.hf_dir}: {r.tensors} tensors, {r.bytes / 1e9:.2f} GB, all identical "
        f"({r.seconds:.1f} s)")


def cmd_export(args) -> None:
  from convert.export import export_checkpoint
  r = export_checkpoint(args.ckpt_dir, args.hf_dir, progress=not args.quiet)
  print(f"exported {args.ckpt_dir} -> {r.path}: {r.tensors} tensors in {r.files} files, {r.bytes / 1e9:.2f} GB "
        f"in {r.seconds:.1f} s")


def _workers(value: str) -> int:
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive number of workers, got {value!r}")
  return n


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
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, s, opts.jnp_dtype, opts.indexer_quant, opts.fp8_latent_cache)

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

  raw = argparse.RawDescriptionHelpFormatter
  p = sub.add_parser("convert", help="HF safetensors (FP8 release or save_pretrained float) -> Orbax checkpoint",
                     description=CONVERT_HELP, formatter_class=raw)
  p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and the safetensors shards")
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="where to write the checkpoint (must not exist)")
  p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8",
                 help="fp8 (default): keep the release's e4m3 weights and 128x128 block scales bit for bit, as the "
                      "model computes with them; bf16: dequantise them (twice the size)")
  p.add_argument("--workers", type=_workers, default=4, metavar="N",
                 help="tensors converted at once (default 4); memory grows with N times the largest tensor")
  p.add_argument("--resume", action="store_true",
                 help="continue the interrupted conversion in CKPT_DIR.partial instead of refusing to start")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("verify", help="compare every tensor of a converted checkpoint with its HF source",
                     description=VERIFY_HELP, formatter_class=raw)
  p.add_argument("hf_dir", metavar="HF_DIR", help="the source the checkpoint was converted from")
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="the converted checkpoint")
  p.add_argument("--workers", type=_workers, default=4, metavar="N", help="tensors compared at once (default 4)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("export", help="write a checkpoint back in the HF release format (safetensors shards)",
                     description=EXPORT_HELP, formatter_class=raw)
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a dsv32-jax checkpoint (from `dsv32 convert`)")
  p.add_argument("hf_dir", metavar="HF_DIR", help="where to write the safetensors shards (must not exist)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=cmd_export)

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
