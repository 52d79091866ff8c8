"""Timing shared by the benchmarks: median wall time of a synchronised call, after a warm-up."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, iters: int = 10) -> float:
  """Median seconds of ``fn(*args)`` over ``iters`` calls, each waited for; one untimed call first
  (compilation and first-touch stay out of the figure)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def chained_seconds(fn, *args, reps: int = 20, iters: int = 5) -> float:
  """Device seconds a call of ``fn(*args)`` takes, with the host's dispatch and synchronisation out of the
  figure: one jitted program runs ``fn`` ``reps`` times in a chain -- each call's smallest floating-point
  input gets 0 x the previous call's first output element added (XLA folds neither that nor the calls
  away; the add is one tiny elementwise kernel) -- and (its median time - one call's program's) / (reps - 1)."""
  import jax.numpy as jnp
  floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
  feed = min(floats, key=lambda i: args[i].size)

  def program(n):
    def run(*a):
      a = list(a)
      out = fn(*a)
      for _ in range(n - 1):
        first = jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32)
        a[feed] = (a[feed].astype(jnp.float32) + 0.0 * first).astype(a[feed].dtype)
        out = fn(*a)
      return out
    return jax.jit(run)

  one = median_seconds(program(1), *args, iters=iters)
  return (median_seconds(program(reps), *args, iters=iters) - one) / (reps - 1)


def measured_hbm_bandwidth(elements: int = 1 << 30) -> float:
  """Bytes/s of a device-to-device copy of float32 elements (default 4 GiB; read + write): the HBM
  ceiling the shares use."""
  import jax.numpy as jnp
  big = jnp.ones((elements,), jnp.float32)
  seconds = median_seconds(jax.jit(lambda x: x + 1), big, iters=5)
  return 2 * big.nbytes / seconds


class Table:
  """Benchmark rows, printed as they come (what, milliseconds, other figures) and kept for the JSON."""

  def __init__(self, width: int = 60):
    self.rows: list[dict] = []
    self.width = width

  def __call__(self, what: str, seconds: float, **extra) -> None:
    self.rows.append({"what": what, "ms": seconds * 1e3, **extra})
    rest = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    print(f"{what:{self.width}s} {seconds * 1e3:10.3f} ms  {rest}", flush=True)


def rel_err(a, b) -> float:
  """Relative norm error of a against b, in float64 on the host."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
