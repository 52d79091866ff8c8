"""How to run the model: precision, the release's FP8 simulations, and which attention form to use.

Static (hashable) settings passed to jitted functions; they never change the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ATTENTION_FORMS = ("naive", "absorbed")     # MLA with per-head keys / in the 512-d latent (MQA mode)
SELECTIONS = ("mask", "gather")             # top-k applied as a score mask / by gathering the chosen rows


@dataclasses.dataclass(frozen=True)
class RunOptions:
  dtype: str = "bfloat16"                   # activation and cache dtype ("float32" for exact comparisons)
  indexer_quant: bool = True                # Hadamard + FP8 e4m3 indexer, as released
  latent_quant: bool = True                 # round the MLA latent through FP8 before caching (Dec 2025 code)
  fp8_latent_cache: bool = False            # cache that latent as e4m3 + a float32 scale per 128 values
                                            # (FlashMLA's 656 bytes a token with the rope part): the same
                                            # values as the bf16 cache in 57% of its bytes
  prefill_attention: str = "naive"          # the official prefill computes MLA unabsorbed
  decode_attention: str = "absorbed"        # and decode in the latent
  prefill_selection: str = "mask"           # the official demo masks dense scores
  decode_selection: str = "gather"          # gathering 2048 rows beats masking 128K at decode
  query_chunk: int = 256                    # queries per block when scoring and attending (bounds memory)
  kernel_query_chunk: int = 4096            # queries per block of a gathered prefill when the DSA kernels
                                            # run: a block then holds only its [queries, keys] float32
                                            # logits (2 GiB at 4096 x 128K); 256-query blocks made the
                                            # 128K layer 1.24x slower on an H100; 4096 (or 4224) beat 2048 by
                                            # 0.8-1.4% in three H200 comparisons (BENCHMARKS.md)
  gathered_prefill_from: int | None = 4096  # a prefill over more keys than this takes the latent form over the
                                            # gathered top-k rows whenever the DSA kernels run on them (GPU,
                                            # TPU): on an H100 it passes the official form (through cuDNN, the
                                            # top-k set as a mask) between 4K and 8K keys (BENCHMARKS.md);
                                            # None keeps prefill_attention / prefill_selection at every length
  kernels: str = "auto"                     # "auto" | "reference" | "pallas": see pallas_kernels.dispatch
  fp8_linear_kernel: bool = True            # block-scaled FP8 linears through the FP8 GEMM kernel where the
                                            # kernels run (GPU, bf16, unsharded); False: the reference's
                                            # product of the dequantised operands (the same products; the
                                            # kernel's FP8 tensor cores sum them in less than float32)
  sharding: Any = None                      # a sharding.ShardingPlan (mesh + logical-axis rules + expert
                                            # parallelism); None runs unsharded, the reference path

  def __post_init__(self):
    if self.dtype not in ("bfloat16", "float32"):
      raise ValueError(f"RunOptions.dtype = {self.dtype!r}: expected 'bfloat16' or 'float32'")
    for name in ("prefill_attention", "decode_attention"):
      if getattr(self, name) not in ATTENTION_FORMS:
        raise ValueError(f"RunOptions.{name} = {getattr(self, name)!r}: expected one of {ATTENTION_FORMS}")
    for name in ("prefill_selection", "decode_selection"):
      if getattr(self, name) not in SELECTIONS:
        raise ValueError(f"RunOptions.{name} = {getattr(self, name)!r}: expected one of {SELECTIONS}")
    for phase in ("prefill", "decode"):
      if getattr(self, f"{phase}_attention") == "naive" and getattr(self, f"{phase}_selection") == "gather":
        raise ValueError(f"RunOptions: {phase}_attention='naive' applies the top-k set as a mask;"
                         f" gathering needs {phase}_attention='absorbed'")
    if self.fp8_latent_cache and not self.latent_quant:
      raise ValueError("RunOptions.fp8_latent_cache needs latent_quant=True: the e4m3 cache holds the latent "
                       "rounded through FP8, it does not round it")
    for name in ("query_chunk", "kernel_query_chunk", "gathered_prefill_from"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"RunOptions.{name} = {getattr(self, name)} must be positive")
    if self.kernels not in ("auto", "reference", "pallas"):
      raise ValueError(f"RunOptions.kernels = {self.kernels!r}: expected 'auto', 'reference' or 'pallas'")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def constrain(self, x, axes: tuple[str | None, ...]):
    """x laid out as the sharding plan's rules place these logical axes (no-op without a plan)."""
    return x if self.sharding is None else self.sharding.constrain(x, axes)

  @property
  def linear_kernels(self) -> str:
    """The kernels setting for the dense linears (``layers.linear``): the FP8 GEMM kernel is one call that
    XLA's partitioner cannot split, so under a sharding plan the linears stay on the reference."""
    return self.kernels if self.sharding is None and self.fp8_linear_kernel else "reference"

  def per_sequence(self, fn):
    """fn, independent across the batch axis (axis 0 of its arguments and results), run on each
    device's own sequences under a sharding plan (XLA's partitioner would replicate some ops, e.g.
    top-k, over a sharded batch); fn itself without a plan."""
    return fn if self.sharding is None else self.sharding.per_sequence(fn)

  def replace(self, **changes) -> "RunOptions":
    return dataclasses.replace(self, **changes)


EXACT_F32 = RunOptions(dtype="float32", indexer_quant=False, latent_quant=False)
"""The model in float32 without the release's FP8 rounding: what transformers computes."""
