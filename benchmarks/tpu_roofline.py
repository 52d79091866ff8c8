"""Roofline of one DSA layer's TPU kernels (indexer logits, top-k, sparse MLA) on v5e, v5p, v6e, TPU7x.

No TPU timing exists: these are lower bounds from the chips' published peaks (JAX's own table,
``jax/_src/tpu_info.py`` of jax 0.11.2, per chip) and the kernels' operation and byte counts. The
VPU rate is an assumption (no public figure): one (8 x 128) f32 operation per cycle on each of 4
vector ALU slots at 1.5 GHz, 6.1e12 element-ops/s per TensorCore, taken for every chip.

  PYTHONPATH=. python benchmarks/tpu_roofline.py > /tmp/roofline.md
"""

from __future__ import annotations

import dataclasses

from jax._src.tpu_info import ChipVersion, _get_tpu_info_impl

# DeepSeek-V3.2 671B, one layer.
INDEX_HEADS, INDEX_DIM, TOPK = 64, 128, 2048
HEADS, LATENT, ROPE = 128, 512, 64
INDEX_KEY_BYTES = INDEX_DIM + 4             # e4m3 key + float32 scale
LATENT_ROW_BYTES = 2 * (LATENT + ROPE)      # bf16 latent + k_pe, as dsv32_jax/cache.py holds them
VPU_PER_CORE = 4 * 8 * 128 * 1.5e9          # ASSUMED f32 element-ops/s per TensorCore

# Kernel operation counts (VPU element-ops, see the kernels' docstrings and docs/tpu.md):
INDEX_VPU_PER_PAIR_HEAD = 4                 # ReLU, weight, head sum, e4m3 -> bf16 widening (amortised)
TOPK_CAPACITY = 48
TOPK_VPU_PER_KEY = 4 + 32 * 3 + 3 + 8 + 2 * TOPK_CAPACITY   # keys, 32 bisection passes, count, compaction
TOPK_BLOCK_ROWS = 8
QUERY_BLOCK = 32                            # IndexLogitsTpuConfig.block_q: key reuse across queries


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16: float          # MXU FLOP/s per chip
  fp8: float           # e4m3 MXU FLOP/s per chip (0: no e4m3 MXU input, widened to bf16)
  hbm: float           # bytes/s per chip
  vmem_mib: int        # per TensorCore
  cores: int           # TensorCores per chip

  @property
  def vpu(self) -> float:
    return VPU_PER_CORE * self.cores

  @property
  def index_mxu(self) -> float:
    return self.fp8 or self.bf16


def chips() -> list[Chip]:
  out = []
  for name, version, cores in [("v5e", ChipVersion.TPU_V5E, 1), ("v5p", ChipVersion.TPU_V5P, 2),
                               ("v6e", ChipVersion.TPU_V6E, 1), ("TPU7x", ChipVersion.TPU_7X, 2)]:
    info = _get_tpu_info_impl(version, 1)   # per TensorCore
    e4m3 = info.is_matmul_supported("float8_e4m3fn", "float8_e4m3fn")
    out.append(Chip(name, info.bf16_ops_per_second * cores, info.fp8_ops_per_second * cores if e4m3 else 0.0,
                    info.mem_bw_bytes_per_second * cores, info.vmem_capacity_bytes // 2 ** 20, cores))
  return out


@dataclasses.dataclass(frozen=True)
class Work:
  mxu_flops: float
  mxu_on_fp8: bool
  vpu_ops: float
  hbm_bytes: float

  def times(self, chip: Chip) -> dict[str, float]:
    return {"MXU": self.mxu_flops / (chip.index_mxu if self.mxu_on_fp8 else chip.bf16),
            "VPU": self.vpu_ops / chip.vpu, "HBM": self.hbm_bytes / chip.hbm}


def prefill(t: int) -> dict[str, Work]:
  """A causal prefill of t tokens (one sequence), one layer."""
  pairs = t * (t + 1) / 2
  blocks = {"tokens": TOPK, "blocks, 32 distinct (clustered)": 32 * 64, "blocks, 256 distinct": 256 * 64}
  work = {
      "indexer logits": Work(2 * INDEX_HEADS * INDEX_DIM * pairs, True, INDEX_VPU_PER_PAIR_HEAD * INDEX_HEADS * pairs,
                             pairs / QUERY_BLOCK * INDEX_KEY_BYTES + 4.0 * t * t),   # keys per q block + logits
      "top-k": Work(0.0, False, TOPK_VPU_PER_KEY * pairs, 4.0 * t * t),               # rows stop at their prefix
  }
  for name, rows in blocks.items():
    work[f"sparse MLA ({name})"] = Work(2 * HEADS * rows * (LATENT + ROPE + LATENT) * t, False, 6 * HEADS * rows * t,
                                        rows * LATENT_ROW_BYTES * t)
  work["(dense masked MLA, today's default prefill)"] = Work(
      2 * HEADS * (192 + 128) * pairs, False, 6 * HEADS * pairs, 0.0)
  return work


def decode(t: int, batch: int) -> dict[str, Work]:
  """One new token for each of `batch` sequences at context t, one layer."""
  rows = TOPK_BLOCK_ROWS * -(-batch // TOPK_BLOCK_ROWS)
  return {
      "indexer logits": Work(2 * INDEX_HEADS * INDEX_DIM * t * batch, True,
                             INDEX_VPU_PER_PAIR_HEAD * INDEX_HEADS * t * batch, (INDEX_KEY_BYTES + 4) * t * batch),
      "top-k": Work(0.0, False, TOPK_VPU_PER_KEY * t * rows, 4.0 * t * batch),
      "sparse MLA (tokens)": Work(2 * HEADS * TOPK * (LATENT + ROPE + LATENT) * batch, False, 6 * HEADS * TOPK * batch,
                                  TOPK * LATENT_ROW_BYTES * batch),
  }


def fmt(seconds: float) -> str:
  if seconds >= 1e-1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-4:
    return f"{seconds * 1e3:.1f} ms"
  return f"{seconds * 1e6:.1f} µs"


def table(title: str, work: dict[str, Work]) -> list[str]:
  lines = [f"**{title}**", "", "| kernel | " + " | ".join(c.name for c in chips()) + " |",
           "|---|" + "---|" * len(chips())]
  for name, w in work.items():
    cells = []
    for chip in chips():
      times = w.times(chip)
      bound = max(times, key=times.get)
      cells.append(f"{fmt(times[bound])} {bound}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines + [""]


def main():
  lines = ["| chip | MXU bf16 | MXU e4m3 | HBM | VMEM / TensorCore | TensorCores | VPU (assumed) |",
           "|---|---|---|---|---|---|---|"]
  for c in chips():
    lines.append(f"| {c.name} | {c.bf16 / 1e12:.0f} TF/s | {f'{c.fp8 / 1e12:.0f} TF/s' if c.fp8 else 'none'} | "
                 f"{c.hbm / 1e12:.2f} TB/s | {c.vmem_mib} MiB | {c.cores} | {c.vpu / 1e12:.1f} T op/s |")
  lines.append("")
  for t in (32768, 131072):
    lines += table(f"Prefill of {t // 1024}K tokens, one layer, one sequence (time at the bound, and the bound)",
                   prefill(t))
    lines += table(f"Decode at {t // 1024}K context, one layer, batch 8 (per step)", decode(t, 8))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
