"""Evaluations of a trained indexer: selection quality per layer, LM loss sparse vs dense, retrieval.

- ``selector_metrics``: per layer, over the queries that see more than k keys, the *recall* of the
  selected set S_t against the true top-k of the head-summed dense attention p_t, the attention *mass*
  of p_t on S_t, and KL(p_t || softmax(I_t)) (the warm-up objective);
- ``lm_eval``: validation cross-entropy and perplexity with dense attention and with DSA at several
  context lengths (k fixed, so the sparsity grows with the length); also over the positions that see
  more than k keys (where the two can differ);
- ``retrieval_probe``: a needle of random tokens planted ~10% into a window of real text is repeated
  at its end. Reading the copy, the model can predict needle[i+1] only by attending back to the first
  occurrence (an induction pattern), ~0.85 of the window away. Reported: copy accuracy and loss with
  dense and sparse attention, and per layer the fraction of copy queries whose selection S_t contains
  the key to retrieve (chance: k / visible keys).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.config import ModelConfig
from train.data import eval_windows
from train.forward import forward
from train.selector import IndexerVariant


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5))
def _lm_losses(params, cfg: ModelConfig, v: IndexerVariant, mode: str, tokens, dtype):
  """Per-position next-token NLL [B, S] in `mode`."""
  logits, _ = forward(params, cfg, v, tokens[:, :-1], mode, dtype)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(1, 2, 4))
def _selector_aux(params, cfg: ModelConfig, v: IndexerVariant, tokens, dtype):
  _, aux = forward(params, cfg, v, tokens, "warmup", dtype, metrics=True)
  return {k: aux[k] for k in ("recall", "mass", "kl_dense", "selected")}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5))
def _probe(params, cfg: ModelConfig, v: IndexerVariant, mode: str, tokens, dtype, q_pos, k_pos):
  logits, aux = forward(params, cfg, v, tokens, mode, dtype, probe=(q_pos, k_pos))
  return logits, aux["probe_hit"], aux["probe_attn"]


def _batches(x: np.ndarray, size: int):
  for i in range(0, len(x), size):
    yield x[i:i + size]


def selector_metrics(params, cfg: ModelConfig, v: IndexerVariant, stream: np.ndarray, length: int, n_windows: int,
                     dtype=jnp.float32, batch: int = 4) -> dict[str, list[float]]:
  """Per-layer means of recall, mass, kl_dense and keys selected over n_windows validation windows."""
  rows = [jax.device_get(_selector_aux(params, cfg, v, jnp.asarray(w), dtype))
          for w in _batches(eval_windows(stream, n_windows, length), batch)]
  return {k: np.mean([r[k] for r in rows], axis=0).tolist() for k in rows[0]}


def lm_eval(params, cfg: ModelConfig, v: IndexerVariant, stream: np.ndarray, lengths, n_windows: int,
            dtype=jnp.float32, batch: int = 4, modes=("dense", "sparse")) -> list[dict]:
  """One row per context length: loss and perplexity per mode, over all positions and past k."""
  rows = []
  for length in lengths:
    windows = eval_windows(stream, n_windows, length + 1)
    k = v.topk(cfg, length)
    row = {"length": length, "k": k}
    for mode in modes:
      nll = np.concatenate([np.asarray(_lm_losses(params, cfg, v, mode, jnp.asarray(w), dtype))
                            for w in _batches(windows, batch)])
      tail = nll[:, k:]
      row[f"{mode}_loss"] = float(nll.mean())
      row[f"{mode}_ppl"] = float(np.exp(nll.mean()))
      row[f"{mode}_loss_past_k"] = float(tail.mean()) if tail.size else float("nan")
      row[f"{mode}_ppl_past_k"] = float(np.exp(tail.mean())) if tail.size else float("nan")
    rows.append(row)
  return rows


def plant_needles(stream: np.ndarray, length: int, trials: int, needle_len: int, vocab_size: int, seed: int = 0):
  """(tokens [trials, length], first occurrence start, second occurrence start): random needles in real text."""
  rng = np.random.default_rng(seed)
  tokens = eval_windows(stream, trials, length).copy()
  first, second = length // 10, length - needle_len
  needles = rng.integers(2, vocab_size, size=(trials, needle_len))  # ids 0, 1 are <|bos|>, <|eos|>
  tokens[:, first:first + needle_len] = needles
  tokens[:, second:] = needles
  return tokens, first, second


def retrieval_probe(params, cfg: ModelConfig, v: IndexerVariant, stream: np.ndarray, length: int, trials: int,
                    needle_len: int = 16, dtype=jnp.float32, seed: int = 0, batch: int = 4,
                    modes=("dense", "sparse")) -> dict:
  """Copy accuracy / loss (dense and/or sparse) on the repeated needle, and per-layer selection hits."""
  tokens, first, second = plant_needles(stream, length, trials, needle_len, cfg.vocab_size, seed)
  i = np.arange(needle_len - 1)
  q_pos, k_pos = jnp.asarray(second + i), jnp.asarray(first + i + 1)   # reading needle[i], retrieve needle[i+1]
  out = {"length": length, "needle_len": needle_len, "distance": second - first, "k": v.topk(cfg, length),
         "chance_hit": float(np.mean(np.minimum(v.topk(cfg, length) / (second + i + 1), 1.0)))}
  for mode, tag in (("warmup", "dense"), ("sparse", "sparse")):
    if tag not in modes:
      continue
    correct, nll, hits, attn = [], [], [], []
    for tb in _batches(tokens, batch):
      logits, hit, att = _probe(params, cfg, v, mode, jnp.asarray(tb), dtype, q_pos, k_pos)
      logits = np.asarray(logits)[:, second:length - 1]                 # predicting needle[1:]
      target = tb[:, second + 1:]
      correct.append(logits.argmax(-1) == target)
      logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
      nll.append(-np.take_along_axis(logp, target[..., None], -1)[..., 0])
      hits.append(np.asarray(hit) * len(tb))
      attn.append(np.asarray(att) * len(tb))
    out[f"{tag}_copy_accuracy"] = float(np.concatenate(correct).mean())
    out[f"{tag}_copy_loss"] = float(np.concatenate(nll).mean())
    per_layer_hit = (np.sum(hits, axis=0) / trials)                      # [layers, pairs]
    out[f"{tag}_hit_per_layer"] = per_layer_hit.mean(-1).tolist()
    out[f"{tag}_hit_best_layer"] = float(per_layer_hit.mean(-1).max())
    out[f"{tag}_attn_on_key_per_layer"] = (np.sum(attn, axis=0) / trials).mean(-1).tolist()
  return out
