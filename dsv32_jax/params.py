"""The parameter pytree: one table of every array, its shape and its logical axes.

Layout (names follow the official ``inference/model.py``; HF names are in ``convert/hf_layout.py``)::

  embed                [vocab, dim]
  dense_layers.*       a Block with a dense SwiGLU FFN, stacked over the first n_dense_layers
  moe_layers.*         a Block with the MoE FFN, stacked over the remaining layers
  norm                 [dim]
  head                 [vocab, dim]
  mtp.*                MTP modules, stacked: enorm, hnorm, eh_proj, block (an MoE Block), norm
                       (their embedding and output head are the main model's)

A *linear* is a dict ``{"weight": [out, in]}`` (float) or ``{"weight": e4m3 [out, in],
"scale": f32 [ceil(out/128), ceil(in/128)]}`` (the release's FP8 format). Weights keep the
checkpoint's [out, in] orientation: the contraction axis is the minor one, as FP8 tensor-core
matmuls want it. Routed experts are stacked on a leading ``experts`` axis for the grouped matmul,
layers on a leading ``layers`` axis for ``jax.lax.scan``.

Logical axis names (mapped to mesh axes by ``sharding``) name what an axis *is*: ``vocab``,
``embed``, ``mlp``, ``experts``, ``expert_mlp``, ``router`` (the gate's expert scores), ``q_lora``,
``kv_lora``, ``q_heads`` (heads x qk dim, flattened as stored), ``kv_heads``, ``o_heads``,
``index_heads``, ``index_n_heads``, ``index_dim``, ``layers``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from dsv32_jax.config import FP8_BLOCK, ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One array of the model: shape, logical axes, and whether the release stores it FP8 + block scale."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  fp8_in_release: bool = False  # a linear weight with a 128x128 `weight_scale_inv` beside it
  init: str = "linear"          # random init: "linear" (std in**-0.5), "residual" (a projection into the
                                # residual stream: smaller), "embed" (std 1), "norm" (~1), "bias" (~0)

  def stacked(self, n: int, axis: str) -> "ParamSpec":
    return dataclasses.replace(self, shape=(n, *self.shape), axes=(axis, *self.axes))


def _linear(out: int, inp: int, out_axis: str, in_axis: str, fp8: bool = True,
            init: str = "linear") -> dict[str, ParamSpec]:
  return {"weight": ParamSpec((out, inp), (out_axis, in_axis), fp8_in_release=fp8, init=init)}


def _norm(n: int, axis: str) -> ParamSpec:
  return ParamSpec((n,), (axis,), init="norm")


def attention_specs(cfg: ModelConfig) -> dict[str, Any]:
  h = cfg.n_heads
  return {
      "wq_a": _linear(cfg.q_lora_rank, cfg.dim, "q_lora", "embed"),
      "q_norm": _norm(cfg.q_lora_rank, "q_lora"),
      "wq_b": _linear(h * cfg.qk_head_dim, cfg.q_lora_rank, "q_heads", "q_lora"),
      "wkv_a": _linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.dim, "kv_lora", "embed"),
      "kv_norm": _norm(cfg.kv_lora_rank, "kv_lora"),
      "wkv_b": _linear(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, "kv_heads", "kv_lora"),
      "wo": _linear(cfg.dim, h * cfg.v_head_dim, "embed", "o_heads", init="residual"),
      "indexer": {
          "wq_b": _linear(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, "index_heads", "q_lora"),
          "wk": _linear(cfg.index_head_dim, cfg.dim, "index_dim", "embed"),
          "k_norm": {"weight": _norm(cfg.index_head_dim, "index_dim"),
                     "bias": ParamSpec((cfg.index_head_dim,), ("index_dim",), init="bias")},
          # not quantised in the release; the December code keeps it in float32
          "weights_proj": _linear(cfg.index_n_heads, cfg.dim, "index_n_heads", "embed", fp8=False),
      },
  }


def _swiglu(inter: int, cfg: ModelConfig, inter_axis: str) -> dict[str, Any]:
  return {"w1": _linear(inter, cfg.dim, inter_axis, "embed"),
          "w2": _linear(cfg.dim, inter, "embed", inter_axis, init="residual"),
          "w3": _linear(inter, cfg.dim, inter_axis, "embed")}


def moe_specs(cfg: ModelConfig) -> dict[str, Any]:
  e = cfg.n_routed_experts
  experts = {name: {"weight": spec["weight"].stacked(e, "experts")}
             for name, spec in _swiglu(cfg.moe_inter_dim, cfg, "expert_mlp").items()}
  tree = {
      # the router's expert axis is not the experts' stacking axis: every device routes its own tokens
      # over all experts, while the experts' weights are split between devices
      "gate": {"weight": ParamSpec((e, cfg.dim), ("router", "embed")),
               "bias": ParamSpec((e,), ("router",), init="bias")},
      "experts": experts,
  }
  if cfg.n_shared_experts:
    tree["shared"] = _swiglu(cfg.n_shared_experts * cfg.moe_inter_dim, cfg, "mlp")
  return tree


def block_specs(cfg: ModelConfig, moe: bool) -> dict[str, Any]:
  return {
      "attn_norm": _norm(cfg.dim, "embed"),
      "attn": attention_specs(cfg),
      "ffn_norm": _norm(cfg.dim, "embed"),
      "ffn": moe_specs(cfg) if moe else _swiglu(cfg.inter_dim, cfg, "mlp"),
  }


def _stack(tree, n: int, axis: str = "layers"):
  return map_specs(lambda s: s.stacked(n, axis), tree)


def model_specs(cfg: ModelConfig) -> dict[str, Any]:
  tree: dict[str, Any] = {
      "embed": ParamSpec((cfg.vocab_size, cfg.dim), ("vocab", "embed"), init="embed"),
      "norm": _norm(cfg.dim, "embed"),
      "head": ParamSpec((cfg.vocab_size, cfg.dim), ("vocab", "embed")),
  }
  if cfg.n_dense_layers:
    tree["dense_layers"] = _stack(block_specs(cfg, moe=False), cfg.n_dense_layers)
  if cfg.n_moe_layers:
    tree["moe_layers"] = _stack(block_specs(cfg, moe=True), cfg.n_moe_layers)
  if cfg.n_mtp_layers:
    tree["mtp"] = _stack({
        "enorm": _norm(cfg.dim, "embed"),
        "hnorm": _norm(cfg.dim, "embed"),
        "eh_proj": _linear(cfg.dim, 2 * cfg.dim, "embed", "embed", fp8=False),
        "block": block_specs(cfg, moe=True),
        "norm": _norm(cfg.dim, "embed"),
    }, cfg.n_mtp_layers)
  return tree


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def map_specs(fn: Callable[..., Any], tree, *rest):
  """Maps fn(spec, *rest_subtrees) over the specs of a spec tree."""
  if is_spec(tree):
    return fn(tree, *rest)
  return {k: map_specs(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}


def flatten_specs(tree, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], ParamSpec]]:
  if is_spec(tree):
    return [(prefix, tree)]
  out = []
  for k, v in tree.items():
    out.extend(flatten_specs(v, (*prefix, k)))
  return out


def scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
  *lead, out, inp = weight_shape
  return (*lead, -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))


def with_release_dtypes(specs) -> dict[str, Any]:
  """Adds the FP8 block-scale arrays beside every linear the release stores in FP8."""
  if is_spec(specs):
    return specs
  out = {}
  for k, v in specs.items():
    out[k] = with_release_dtypes(v)
    if k == "weight" and is_spec(v) and v.fp8_in_release:
      out["scale"] = ParamSpec(scale_shape(v.shape), v.axes, init="scale")
  return out


def init_params(cfg: ModelConfig, seed: int = 0, fp8: bool = True) -> Params:
  """Random parameters in the release's storage dtypes, as host numpy arrays.

  fp8=True: e4m3 linear weights with ue8m0 block scales, bf16 embeddings/head/norms/gate,
  float32 gate bias -- exactly what a release checkpoint holds. fp8=False: those linears in bf16.
  Values are scaled like a trained network's: activations stay O(1) (weights ~ N(0, 1/in)) and each
  layer adds a modest update to the residual stream (projections into it are scaled down by
  sqrt(2 * layers), as GPT-2 initialises them), so small numerical differences do not grow chaotically
  from layer to layer -- which keeps bf16 and FP8 comparisons in tests meaningful.
  """
  import ml_dtypes

  from dsv32_jax.quant import quantize_weight_np

  rng = np.random.default_rng(seed)
  bf16 = ml_dtypes.bfloat16

  def init_one(spec: ParamSpec):
    shape = spec.shape
    if spec.init == "embed":
      return rng.standard_normal(shape, np.float32).astype(bf16)
    if spec.init == "norm":
      return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(bf16)
    if spec.init == "bias":
      return (0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    std = shape[-1] ** -0.5
    if spec.init == "residual":
      std /= np.sqrt(2.0 * (cfg.n_layers + cfg.n_mtp_layers))
    w = rng.standard_normal(shape, np.float32) * np.float32(std)
    return w.astype(bf16)

  def build(tree):
    out = {}
    for k, v in tree.items():
      if is_spec(v):
        w = init_one(v)
        if k == "weight" and v.fp8_in_release and fp8:
          w, scale = quantize_weight_np(w.astype(np.float32))
          out["scale"] = scale
        out[k] = w
      else:
        out[k] = build(v)
    return out

  return build(model_specs(cfg))
