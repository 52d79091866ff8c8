"""The selector ablation harness: one command runs a grid from a TOML file and writes tables and plots.

  python -m train.ablate train/grids/cpu_tiny.toml

The grid file::

  [run]                      # where and how long
  preset = "cpu-tiny"        # the model and the stages (train.presets)
  workdir = "runs/cpu-tiny"  # the dense model is trained there (or restored, when the recipe ran)
  reports = "reports/ablation-cpu-tiny"
  mode = "axes"              # "axes": one axis at a time around [base]; "product": every combination
  warmup_steps = 60          # dense warm-up of each point's fresh indexers
  sparse_steps = 0           # then sparse steps (these also train the main model: 0 keeps it shared)
  eval_length = 256          # selector metrics and perplexity at this length
  probe_length = 256         # retrieval probe (0: none)

  [base]                     # the base point: the release's indexer at the preset's sizes
  index_n_heads = 4

  [axes]                     # the values to try
  index_n_heads = [1, 4, 16]
  score_dtype = ["fp8", "bfloat16"]

Axes: ``index_n_heads``, ``index_head_dim``, ``index_topk`` (model config), and the ``IndexerVariant``
fields ``score_dtype`` (fp8 | bfloat16 | float32), ``score`` (relu | softmax), ``hadamard``,
``head_weights``, ``topk_fraction`` (k as a fraction of the context), ``granularity`` (token | block),
``block``. Every point starts from the same dense model with fresh indexers (seeded), is warmed up (and
optionally sparse-trained), then evaluated. Output in ``reports``: ``ablation.csv``, ``ablation.md``,
``ablation.json`` and one PNG per axis (recall, attention mass, perplexity vs the axis). Each point
checkpoints under ``workdir/ablation/<preset, steps, seed>/<all its settings>/``: a rerun skips
finished points.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dsv32_jax.params import init_params
from train import metrics, report
from train.loop import float_params, indexer_params, train_stage, with_indexers
from train.presets import preset
from train.recipe import Deadline, dense_model, prepare_data
from train.selector import RELEASE, IndexerVariant

CONFIG_AXES = ("index_n_heads", "index_head_dim", "index_topk")
VARIANT_AXES = tuple(f.name for f in dataclasses.fields(IndexerVariant))
RUN_DEFAULTS = {"mode": "axes", "warmup_steps": None, "sparse_steps": None, "eval_length": None, "probe_length": None,
                "eval_windows": None, "seed": 0, "budget_seconds": None}


def load_grid(path: str | Path) -> dict:
  with open(path, "rb") as f:
    grid = tomllib.load(f)
  return validate_grid(grid, str(path))


def validate_grid(grid: dict, source: str = "grid") -> dict:
  unknown = set(grid) - {"run", "base", "axes"}
  if unknown:
    raise ValueError(f"{source}: unknown sections {sorted(unknown)} (expected [run], [base], [axes])")
  run = {**RUN_DEFAULTS, **grid.get("run", {})}
  for key in ("preset", "workdir", "reports"):
    if key not in run:
      raise ValueError(f"{source}: [run] needs '{key}'")
  if run["mode"] not in ("axes", "product"):
    raise ValueError(f"{source}: [run] mode = {run['mode']!r}: expected 'axes' or 'product'")
  for section in ("base", "axes"):
    for name in grid.get(section, {}):
      if name not in CONFIG_AXES + VARIANT_AXES:
        raise ValueError(f"{source}: [{section}] {name!r} is not an axis; choose from {CONFIG_AXES + VARIANT_AXES}")
  for name, values in grid.get("axes", {}).items():
    if not isinstance(values, list) or not values:
      raise ValueError(f"{source}: [axes] {name} must be a non-empty list")
  return {"run": run, "base": dict(grid.get("base", {})), "axes": dict(grid.get("axes", {}))}


def points(grid: dict) -> list[dict]:
  """The settings of every point: the base updated by one axis value ("axes") or by each combination."""
  base, axes = grid["base"], grid["axes"]
  if grid["run"]["mode"] == "product":
    names = list(axes)
    out = [{**base, **dict(zip(names, combo))} for combo in itertools.product(*(axes[n] for n in names))]
  else:
    out = [dict(base)]
    for name, values in axes.items():
      for value in values:
        pt = {**base, name: value}
        if pt not in out:
          out.append(pt)
  return out


def point_name(pt: dict, base: dict) -> str:
  changed = {k: v for k, v in pt.items() if base.get(k) != v}
  return "base" if not changed else ",".join(f"{k}={v}" for k, v in sorted(changed.items()))


def point_dir(pt: dict, preset_name: str, warmup_steps: int, sparse_steps: int, seed: int) -> str:
  """The checkpoint directory of a point: every setting in the name, so that grids never share one by accident."""
  settings = ",".join(f"{k}={v}" for k, v in sorted(pt.items())) or "release"
  return f"ablation/{preset_name}-w{warmup_steps}-s{sparse_steps}-seed{seed}/{settings}"


def run_grid(grid: dict, progress: bool = True, corpus_wheel=None, max_chars=None, dense_params=None) -> list[dict]:
  """Runs every point (dense_params: the trained dense model, else trained or restored in the workdir)."""
  run = grid["run"]
  p = preset(run["preset"])
  workdir, reports = Path(run["workdir"]).absolute(), Path(run["reports"])
  reports.mkdir(parents=True, exist_ok=True)
  deadline = Deadline(run["budget_seconds"])
  dtype = jnp.dtype(p.dtype)
  warm_steps = run["warmup_steps"] if run["warmup_steps"] is not None else p.ablation_warmup_steps
  sparse_steps = run["sparse_steps"] if run["sparse_steps"] is not None else p.ablation_sparse_steps
  eval_length = run["eval_length"] or p.stage("dense").seq_len
  probe_length = run["probe_length"] if run["probe_length"] is not None else eval_length
  n_windows = run["eval_windows"] or p.eval_windows
  data = prepare_data(p, workdir, corpus_wheel, max_chars)
  dense = dense_params if dense_params is not None else dense_model(p, data, workdir, run["seed"], progress,
                                                                   deadline).params
  pts = points(grid)
  rows, dense_lm = [], None  # warm-up-only points share the main model: its dense perplexity once
  for i, pt in enumerate(pts):
    name = point_name(pt, grid["base"])
    cfg = p.model.replace(**{k: v for k, v in pt.items() if k in CONFIG_AXES})
    v = RELEASE.replace(**{k: v for k, v in pt.items() if k in VARIANT_AXES})
    fresh = indexer_params(float_params(init_params(cfg, seed=run["seed"] + 1, fp8=False)))
    params = with_indexers(dense, fresh)
    t = time.perf_counter()
    cap, budget = p.ablation_max_seconds, deadline.remaining()
    if budget is not None:  # leave each remaining point its share, evaluations included
      share = max(0.6 * budget / (len(pts) - i), 5.0)
      cap = share if cap is None else min(cap, share)
    where = point_dir(pt, p.name, warm_steps, sparse_steps, run["seed"])
    st = p.stage("warmup").replace(name=f"{where}/warmup", steps=warm_steps, max_seconds=cap)
    res = train_stage(params, cfg, v, st, data.train, workdir, dtype, p.remat, progress)
    params, tps, steps_done = res.params, res.tokens_per_second, {"warmup": res.steps_done}
    if sparse_steps:
      st = p.stage("sparse").replace(name=f"{where}/sparse", steps=sparse_steps)
      res = train_stage(params, cfg, v, st, data.train, workdir, dtype, p.remat, progress)
      params, steps_done["sparse"] = res.params, res.steps_done
    train_s = time.perf_counter() - t
    sel = metrics.selector_metrics(params, cfg, v, data.val, eval_length, n_windows, dtype)
    if sparse_steps or dense_lm is None:
      dense_lm = metrics.lm_eval(params, cfg, v, data.val, [eval_length], n_windows, dtype, modes=("dense",))[0]
    lm = {**dense_lm, **metrics.lm_eval(params, cfg, v, data.val, [eval_length], n_windows, dtype,
                                        modes=("sparse",))[0]}
    row = {"point": name, **{k: pt.get(k, getattr(cfg, k, None) if k in CONFIG_AXES else getattr(v, k))
                             for k in list(grid["axes"])},
           "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
           "k": lm["k"], "keys_selected": float(np.mean(sel["selected"])),
           "recall": float(np.mean(sel["recall"])), "mass": float(np.mean(sel["mass"])),
           "kl_dense": float(np.mean(sel["kl_dense"])), "recall_per_layer": sel["recall"],
           "dense_ppl": lm["dense_ppl"], "sparse_ppl": lm["sparse_ppl"],
           "ppl_increase": lm["sparse_ppl"] / lm["dense_ppl"] - 1.0,
           "warmup_steps": steps_done["warmup"], "sparse_steps": steps_done.get("sparse", 0),
           "train_seconds": train_s, "tokens_per_s": tps}
    if probe_length:
      pr = metrics.retrieval_probe(params, cfg, v, data.val, probe_length, p.probe_trials, dtype=dtype,
                                   modes=("sparse",))
      row.update({"probe_hit_best_layer": pr["sparse_hit_best_layer"], "probe_copy_acc_sparse": pr["sparse_copy_accuracy"]})
    rows.append(row)
    write_tables(rows, grid, reports)
  write_plots(rows, grid, reports)
  return rows


TABLE_COLUMNS = ("point", "index_n_heads", "index_head_dim", "k", "keys_selected", "recall", "mass", "kl_dense",
                 "dense_ppl", "sparse_ppl", "ppl_increase", "probe_hit_best_layer", "probe_copy_acc_sparse",
                 "warmup_steps", "sparse_steps", "train_seconds", "tokens_per_s")


def write_tables(rows: list[dict], grid: dict, reports: Path) -> None:
  axes = [a for a in grid["axes"] if a not in TABLE_COLUMNS]
  cols = [c for c in ("point", *axes, *TABLE_COLUMNS[1:]) if any(c in r for r in rows)]
  report.write_csv(reports / "ablation.csv", rows, [*cols, "recall_per_layer"])
  report.write_json(reports / "ablation.json", {"grid": grid, "rows": rows})
  run = grid["run"]
  text = [f"# Selector ablation: preset `{run['preset']}`, mode `{run['mode']}`", "",
          f"Base point: {grid['base'] or 'the preset (release indexer)'}. Each point: fresh indexers on the same "
          f"dense model, dense warm-up, then evaluation on the validation plays. recall = |S_t ∩ top-k(p_t)| / k, "
          "mass = p_t(S_t), p_t the head-summed dense attention; ppl_increase = sparse / dense perplexity - 1; "
          "probe = needle retrieval (fraction of copy queries whose S_t holds the needle token, best layer).", "",
          report.markdown_table(rows, cols), ""]
  text += [f"![{a}]({a}.png)" for a in grid["axes"]]
  (reports / "ablation.md").write_text("\n".join(text) + "\n")


def write_plots(rows: list[dict], grid: dict, reports: Path) -> None:
  plt = report.pyplot()
  base = grid["base"]
  for axis, values in grid["axes"].items():
    sel = [r for r in rows if all(r.get(k) == v for k, v in base.items() if k != axis)] or rows
    sel = [r for r in sel if r.get(axis, None) in values] or sel
    labels = [str(r.get(axis)) for r in sel]
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axs, (("recall", "recall@k"), ("mass", "attention mass on S_t"),
                                      ("ppl_increase", "sparse / dense perplexity - 1"))):
      ax.bar(range(len(sel)), [r[key] for r in sel], color="tab:blue")
      ax.set_xticks(range(len(sel)), labels)
      ax.set_xlabel(axis)
      ax.set_title(title)
    fig.suptitle(f"selector ablation: {axis}")
    fig.tight_layout()
    fig.savefig(reports / f"{axis}.png", dpi=90)
    plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("grid", help="the grid's TOML file")
  ap.add_argument("--corpus-wheel", default=None)
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  grid = load_grid(args.grid)
  rows = run_grid(grid, progress=not args.no_progress, corpus_wheel=args.corpus_wheel)
  print(Path(grid["run"]["reports"]) / "ablation.md", f"({len(rows)} points)")


if __name__ == "__main__":
  main()
