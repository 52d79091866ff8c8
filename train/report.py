"""Writing results: CSV and Markdown tables, JSON, and matplotlib PNG plots (headless Agg backend)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence


def fmt(x) -> str:
  if isinstance(x, bool) or x is None:
    return str(x)
  if isinstance(x, float):
    if math.isnan(x):
      return "nan"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
  if isinstance(x, (list, tuple)):
    return " / ".join(fmt(v) for v in x)
  return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  columns = list(columns or rows[0].keys())
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
  columns = list(columns or rows[0].keys())
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({c: (json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c, "")) for c in columns})


def write_json(path: str | Path, obj) -> None:
  Path(path).write_text(json.dumps(obj, indent=2, default=float))


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
