"""Session 23, call 2: how much of the Mosaic GPU sparse MLA prefill is the row gather (H200), side by side.

- ``full``: the kernel as it is (each of a query's two 64-head CTAs gathers all 64 rows of every tile);
- ``half``: a copy whose producer copies only rows 0-31 of each tile (rows 32-63 keep stale bytes: the
  numbers are wrong, the timing is what a 2-CTA cluster sharing each gathered row would move per SM);
- ``nocopy``: no row copies at all (session 20's ceiling of the consumers' chain).
2048 queries x 128 heads x top-k 2048, random and window rows, at 4K and 128K (the inputs of
``benchmarks/sparse_mla_mgpu_check.py``; the run used a local copy making the same draws).
"""
import sys
import types

import jax

from benchmarks.sparse_mla_mgpu_check import inputs
from benchmarks.timing import median_seconds
from pallas_kernels import sparse_mla_mgpu as mgpu
from pallas_kernels.sparse_mla_gpu import flops

SRC = open(mgpu.__file__).read()
COPY = "          nvvm.cp_async_shared_global(dst_ptr, src_ptr, PIECE, nvvm.LoadCacheModifierKind.CG)\n"
ROWS = "    for m in range(BLOCK_K // 16):\n"


def variant(name, old, new):
  assert SRC.count(old) == 1, old
  mod = types.ModuleType(f"sparse_mla_mgpu_{name}")
  sys.modules[mod.__name__] = mod
  exec(compile(SRC.replace(old, new), f"sparse_mla_mgpu_{name}.py", "exec"), mod.__dict__)
  return mod


mods = {"full": mgpu, "half": variant("half", ROWS, "    for m in range(BLOCK_K // 32):\n"),
        "nocopy": variant("nocopy", COPY, "          pass\n")}
f = flops(1, 2048, 128, 512, 64, 2048)
for t in (4096, 131072):
  for window in (False, True):
    a = inputs(jax.random.key(t), 1, 2048, 128, t, 2048, pattern='window' if window else 'random')
    for name, mod in mods.items():
      if name == "nocopy" and window:
        continue
      sec = median_seconds(jax.jit(lambda *x, mod=mod: mod.sparse_mla_mgpu(*x, 0.07)[0]), *a, iters=10)
      print(f"prefill {t:7d} {'window' if window else 'random':7s} {name:7s} {sec * 1e3:8.3f} ms "
            f"{f / sec / 1e12:6.1f} TFLOP/s", flush=True)
    del a
