"""Small helpers shared by the Pallas Mosaic TPU kernels (no kernel lives here).

The TPU kernels run in two ways: compiled by Mosaic on a TPU backend, or on any other backend in
Pallas TPU *interpret mode*, which executes the kernel's real semantics (DMAs, semaphores, scalar
prefetch, VMEM/SMEM scratch) on the CPU. Interpret mode is what the CPU test suite runs.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128
NUM_SUBLANES = 8


def on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def interpret_params(interpret: bool | pltpu.InterpretParams | None) -> bool | pltpu.InterpretParams:
  """What to pass as ``pallas_call(interpret=...)``.

  ``None`` picks by backend: compiled on a TPU, interpreted (TPU semantics on the CPU) elsewhere.
  Tests pass ``pltpu.InterpretParams(detect_races=True)`` to also run the race detector.
  """
  if interpret is None:
    return False if on_tpu() else pltpu.InterpretParams()
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b
