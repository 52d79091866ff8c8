"""Generate golden fixtures from Hugging Face transformers' ``DeepseekV32ForCausalLM`` (CPU, float32).

This script is provenance for the files under ``tests/golden/<name>/``; the test suite never imports it.
It needs the oracle environment described in /work/shared/README.md (torch CPU + transformers >= 5.x):

    PYENV_VERSION=3.11.7 python3.11 -m venv .oracle
    .oracle/bin/pip install <torch-*+cpu-cp311 wheel> transformers safetensors numpy
    .oracle/bin/python tests/golden/make_golden.py            # all fixtures
    .oracle/bin/python tests/golden/make_golden.py tiny_a     # just one

For every config in ``CONFIGS`` it builds a tiny random model, overwrites the weights with a
non-degenerate random init (``init_weights``), runs one float32 forward over random tokens with the
eager attention / eager experts code paths, and writes:

    config.json, generation_config.json, model.safetensors   exactly as ``model.save_pretrained(dir)`` writes them
    tokens.npy          int32   [B, S]      input ids (no padding, positions 0..S-1)
    logits.npy          float32 [B, S, V]   logits at every position (use_cache=False)
    topk_indices.npz    layer_{i}: int32 [B, S, index_topk]  the indexer's top-k key indices, as HF returns them
    index_scores.npz    layer_{i}: float32 [B, S, S]  the indexer scores HF ranked; causally masked entries = -inf
    routing.npz         layer_{i}_experts: int32 [B*S, top_k] (ascending), layer_{i}_weights: float32 [B*S, top_k]
                        (aligned, routed_scaling_factor included), layer_{i}_logits: float32 [B*S, n_routed_experts]
    meta.json           versions, seed, config values, diagnostics and notes

Before writing, every output is cross-checked against ``reference_forward``: an independent float64 NumPy
re-implementation that reads only the saved config.json and model.safetensors. It pins down the exact
math (norms, RoPE layouts, scalings, masking, routing) that dsv32-jax has to reproduce.

Top-k rows with fewer causal keys than index_topk (t + 1 < index_topk): HF ranks the masked (future)
keys too, so ``topk_indices[b, t]`` holds the t + 1 valid keys first (sorted by descending score) and
then index_topk - t - 1 arbitrary future positions (ties at -inf / finfo.min broken by torch.topk).
The future picks are harmless (the causal mask still removes them) but are not meaningful: compare
``topk_indices[b, t, :min(t + 1, k)]`` as a set.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

GOLDEN_DIR = Path(__file__).resolve().parent
BATCH = 2

# Release-like YaRN block (671B: factor 40, original 4096, beta 32/1, mscale 1/1). A small
# original_max_position_embeddings moves the YaRN ramp so that at rope dim 32 most frequencies are
# interpolated; tiny_b keeps the release's 4096 (rope dim 64: ramp low = 10, high = 23, as in 671B).
def _yarn(original_max_position_embeddings: int) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": original_max_position_embeddings,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


CONFIGS: dict[str, dict] = {
    # 2 layers (dense, MoE); 8 experts in 4 groups of 2, 2 groups kept, 2 experts per token;
    # indexer 16 heads x 64 (rope 32), top-12 of up to 48 keys.
    "tiny_a": dict(
        seed=1000,
        seq_len=48,
        model=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            index_n_heads=16,
            index_head_dim=64,
            index_topk=12,
            max_position_embeddings=256 * 40,
            rope_parameters=_yarn(256),
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            num_nextn_predict_layers=1,  # as in the release; HF builds no MTP layer
        ),
    ),
    # 3 layers (dense, MoE, MoE); 12 experts in 4 groups of 3, 2 groups kept, 3 experts per token;
    # 3 MLA heads with v_head_dim != qk_nope_head_dim; indexer 16 heads x 128 (rope 64), top-16 of up to 64.
    "tiny_b": dict(
        seed=2003,  # seeds 2000-2002 put a top-k boundary within 1e-4 relative (see check_and_describe)
        seq_len=64,
        model=dict(
            vocab_size=320,
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=3,
            num_key_value_heads=3,
            q_lora_rank=16,
            kv_lora_rank=48,
            qk_nope_head_dim=16,
            qk_rope_head_dim=64,
            v_head_dim=24,
            n_routed_experts=12,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            index_n_heads=16,  # with 8 heads some rows get exact ties at 0 (all heads relu'd away)
            index_head_dim=128,
            index_topk=16,
            max_position_embeddings=4096 * 40,
            rope_parameters=_yarn(4096),
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            num_nextn_predict_layers=1,
        ),
    ),
}


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------

ROUTER_STD_GAIN = 2.0  # router logits ~ N(0, 2^2): sigmoid scores spread over (0, 1)
SCORE_BIAS_STD = 0.1  # e_score_correction_bias ~ N(0, 0.1^2): changes some but not most selections


@torch.no_grad()
def init_weights(model: DeepseekV32ForCausalLM, seed: int) -> None:
    """Overwrite every weight with a random value that keeps activations O(1).

    HF's own init (std 0.02, norms at 1, zero correction bias) makes tiny models nearly degenerate.
    Here: linear / expert matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), RMSNorm and LayerNorm
    weights ~ 1 + N(0, 0.1^2) (so a missing norm weight is detected), indexer k_norm bias ~ N(0, 0.1^2),
    router ~ N(0, ROUTER_STD_GAIN^2/hidden), e_score_correction_bias ~ N(0, SCORE_BIAS_STD^2).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.copy_(normal(p.shape, 1.0))
        elif name.endswith("k_norm.bias"):
            p.copy_(normal(p.shape, 0.1))
        elif p.ndim == 1:  # RMSNorm / LayerNorm weights
            p.copy_(1.0 + normal(p.shape, 0.1))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(normal(p.shape, ROUTER_STD_GAIN * p.shape[-1] ** -0.5))
        else:  # nn.Linear [out, in] and fused experts [E, out, in]: fan_in is the last dim
            p.copy_(normal(p.shape, p.shape[-1] ** -0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, SCORE_BIAS_STD))


def build_model(model_kwargs: dict, seed: int) -> DeepseekV32ForCausalLM:
    config = DeepseekV32Config(**model_kwargs)
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(config)
    init_weights(model, seed)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# HF forward with captures
# --------------------------------------------------------------------------------------------------


class IndexScoreCapture(TorchFunctionMode):
    """Records the tensor that ``Tensor.topk`` ranks while an indexer forward is running.

    The indexer's only top-k call is ``index_scores.topk(topk, dim=-1)`` on its masked [B, S, T]
    scores, so this captures exactly what HF ranks without re-implementing anything.
    """

    def __init__(self):
        super().__init__()
        self.layer: int | None = None
        self.scores: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.topk and self.layer is not None:
            assert self.layer not in self.scores, "more than one topk inside the indexer"
            self.scores[self.layer] = args[0].detach().clone()
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def hf_forward(model: DeepseekV32ForCausalLM, tokens: np.ndarray) -> dict:
    """One full-sequence forward; returns logits, indexer top-k + scores, and router outputs per layer."""
    capture = IndexScoreCapture()
    topk, routing, hooks = {}, {}, []

    def enter(i):
        capture.layer = i

    def leave(i, out):
        capture.layer = None
        topk[i] = out.detach().clone()

    for i, layer in enumerate(model.model.layers):
        indexer = layer.self_attn.indexer
        hooks.append(indexer.register_forward_pre_hook(lambda m, a, i=i: enter(i)))
        hooks.append(indexer.register_forward_hook(lambda m, a, out, i=i: leave(i, out)))
        if hasattr(layer.mlp, "gate"):  # MoE layer: router returns (logits, topk_weights, topk_indices)
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: routing.__setitem__(i, out)))
    try:
        with capture:
            logits = model(input_ids=torch.from_numpy(tokens).long(), use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()

    B, S = tokens.shape
    causal = np.tril(np.ones((S, S), dtype=bool))
    out = {"logits": logits.numpy(), "topk": {}, "scores": {}, "routing": {}}
    for i, idx in topk.items():
        assert idx.dtype == torch.int32 and idx.shape == (B, S, min(model.config.index_topk, S))
        out["topk"][i] = idx.numpy()
        # HF adds its float mask (0 / finfo.min) in eager mode; store masked entries as -inf instead.
        out["scores"][i] = np.where(causal, capture.scores[i].numpy(), -np.inf).astype(np.float32)
    for i, (router_logits, weights, experts) in routing.items():
        order = torch.argsort(experts, dim=-1)
        out["routing"][i] = {
            "experts": torch.gather(experts, 1, order).numpy().astype(np.int32),
            "weights": torch.gather(weights, 1, order).numpy().astype(np.float32),
            "logits": router_logits.numpy().astype(np.float32),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference (reads only config.json + model.safetensors)
# --------------------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + eps) * w + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def yarn_get_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(rp: dict, dim: int) -> tuple[int, int]:
    """Frequency indices where the YaRN ramp starts (low) and ends (high)."""
    base, orig = rp["rope_theta"], rp["original_max_position_embeddings"]

    def correction_dim(num_rotations):
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rp["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rp["beta_slow"])), dim - 1)
    return low, high


def yarn_inv_freq(rp: dict, dim: int) -> np.ndarray:
    """DeepSeek's precompute_freqs_cis frequencies (== HF _compute_yarn_parameters with truncate=True).

    Index j < low keeps base^(-2j/dim); j >= high is divided by factor; linear ramp in between.
    """
    freqs = 1.0 / rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low, high = yarn_correction_range(rp, dim)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)
    return freqs / rp["factor"] * ramp + freqs * (1.0 - ramp)


def rope_interleaved(x, cos, sin):
    """MLA RoPE, DeepSeek layout: rotate pairs (x[2i], x[2i+1]); output stays interleaved.

    (HF writes the rotated pairs de-interleaved, [evens | odds], for both q and k, so q.k is the same.)
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def rope_half_split(x, cos, sin):
    """Indexer RoPE: rotate pairs (x[i], x[i + d/2]) (rotate_half / non-interleaved)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def topk_desc(x, k):
    """Indices of the k largest entries along the last axis, in descending order."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def ref_indexer(W, p, cfg, x, qr, cos, sin):
    B, S, _ = x.shape
    nh, hd, dr = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    q = (qr @ W[p + "wq_b.weight"].T).reshape(B, S, nh, hd)
    k = layer_norm(x @ W[p + "wk.weight"].T, W[p + "k_norm.weight"], W[p + "k_norm.bias"], 1e-6)
    # RoPE on the FIRST qk_rope_head_dim dims of each head, half-split layout; the rest passes through.
    q = np.concatenate([rope_half_split(q[..., :dr], cos[:, None], sin[:, None]), q[..., dr:]], axis=-1)
    k = np.concatenate([rope_half_split(k[..., :dr], cos, sin), k[..., dr:]], axis=-1)
    per_head = np.maximum(np.einsum("bshd,btd->bsht", q, k) * hd**-0.5, 0.0)  # relu(q.k / sqrt(d))
    w = (x @ W[p + "weights_proj.weight"].T) * nh**-0.5
    scores = np.einsum("bsh,bsht->bst", w, per_head)
    causal = np.tril(np.ones((S, S), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    chosen = topk_desc(scores, min(cfg["index_topk"], S))
    selected = np.zeros((B, S, S), dtype=bool)
    np.put_along_axis(selected, chosen, True, axis=-1)
    return scores, selected & causal


def ref_attention(W, p, cfg, x, cos, sin):
    B, S, _ = x.shape
    H, dn, dr, dv, r = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                          "v_head_dim", "kv_lora_rank"))
    rp = cfg["rope_parameters"]
    scale = (dn + dr) ** -0.5 * yarn_get_mscale(rp["factor"], rp["mscale_all_dim"]) ** 2

    qr = rms_norm(x @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"], 1e-6)
    q = (qr @ W[p + "q_b_proj.weight"].T).reshape(B, S, H, dn + dr)  # per head [nope | rope]
    q_nope, q_pe = q[..., :dn], rope_interleaved(q[..., dn:], cos[:, None], sin[:, None])
    ckv = x @ W[p + "kv_a_proj_with_mqa.weight"].T  # [latent r | rope dr]
    c = rms_norm(ckv[..., :r], W[p + "kv_a_layernorm.weight"], 1e-6)
    k_pe = rope_interleaved(ckv[..., r:], cos, sin)  # one rope key per token, shared by all heads
    kv = (c @ W[p + "kv_b_proj.weight"].T).reshape(B, S, H, dn + dv)  # per head [k_nope | v]
    k_nope, v = kv[..., :dn], kv[..., dn:]

    logits = (np.einsum("bshd,bthd->bhst", q_nope, k_nope) + np.einsum("bshd,btd->bhst", q_pe, k_pe)) * scale
    index_scores, allowed = ref_indexer(W, p + "indexer.", cfg, x, qr, cos, sin)
    logits = np.where(allowed[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, H * dv)
    return o @ W[p + "o_proj.weight"].T, index_scores, allowed


def swiglu(W, p, x):
    return (silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def route(cfg, scores, bias, group_limited=True):
    """DeepSeek-V3 routing: choose by sigmoid + bias within the best groups; weight by the plain sigmoid."""
    N, E = scores.shape
    G, K = cfg["n_group"], cfg["num_experts_per_tok"]
    choice = scores + bias
    if group_limited:
        group_scores = np.sort(choice.reshape(N, G, E // G), axis=-1)[..., -2:].sum(-1)  # top-2 sum per group
        keep = np.zeros((N, G), dtype=bool)
        np.put_along_axis(keep, topk_desc(group_scores, cfg["topk_group"]), True, axis=-1)
        choice = np.where(np.repeat(keep, E // G, axis=-1), choice, -np.inf)
    experts = np.sort(topk_desc(choice, K), axis=-1)
    weights = np.take_along_axis(scores, experts, axis=-1)
    if cfg["norm_topk_prob"]:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return experts, weights * cfg["routed_scaling_factor"], choice


def ref_moe(W, p, cfg, x):
    h = x.reshape(-1, x.shape[-1])
    router_logits = h @ W[p + "gate.weight"].T
    scores = 1.0 / (1.0 + np.exp(-router_logits))
    experts, weights, _ = route(cfg, scores, W[p + "gate.e_score_correction_bias"])
    y = np.zeros_like(h)
    for e in range(cfg["n_routed_experts"]):
        tok, slot = np.nonzero(experts == e)
        if len(tok):
            y[tok] += weights[tok, slot, None] * swiglu(W, f"{p}experts.{e}.", h[tok])
    y += swiglu(W, p + "shared_experts.", h)
    routing = {"experts": experts, "weights": weights, "logits": router_logits, "scores": scores}
    return y.reshape(x.shape), routing


def reference_forward(fixture_dir: Path, tokens: np.ndarray) -> dict:
    cfg = json.loads((fixture_dir / "config.json").read_text())
    W = {k: v.astype(np.float64) for k, v in safetensors.numpy.load_file(fixture_dir / "model.safetensors").items()}
    eps = cfg["rms_norm_eps"]
    B, S = tokens.shape
    rp = cfg["rope_parameters"]
    angles = np.outer(np.arange(S, dtype=np.float64), yarn_inv_freq(rp, cfg["qk_rope_head_dim"]))
    # HF multiplies cos/sin by attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    attention_factor = yarn_get_mscale(rp["factor"], rp["mscale"]) / yarn_get_mscale(rp["factor"], rp["mscale_all_dim"])
    cos, sin = np.cos(angles) * attention_factor, np.sin(angles) * attention_factor  # [S, dr/2]

    h = W["model.embed_tokens.weight"][tokens]
    out = {"scores": {}, "selected": {}, "routing": {}}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a, out["scores"][i], out["selected"][i] = ref_attention(
            W, p + "self_attn.", cfg, rms_norm(h, W[p + "input_layernorm.weight"], eps), cos, sin)
        h = h + a
        x = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            h = h + swiglu(W, p + "mlp.", x)
        else:
            m, out["routing"][i] = ref_moe(W, p + "mlp.", cfg, x)
            h = h + m
    h = rms_norm(h, W["model.norm.weight"], eps)
    out["logits"] = h @ W["lm_head.weight"].T  # every position
    return out


# --------------------------------------------------------------------------------------------------
# Checks and diagnostics
# --------------------------------------------------------------------------------------------------


def max_rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def boundary_gap(scores, k):
    """Smallest (k-th - (k+1)-th largest) over rows with more than k finite entries, relative to the row's max |score|."""
    finite = np.isfinite(scores)
    rows = finite.sum(-1) > k
    s = -np.sort(-np.where(finite, scores, -np.inf), axis=-1)[rows]
    scale = np.max(np.abs(np.where(np.isfinite(s), s, 0.0)), axis=-1)
    return float(np.min((s[:, k - 1] - s[:, k]) / scale))


def check_and_describe(model, hf, ref, saved_dir: Path, tokens: np.ndarray) -> dict:
    cfg = model.config
    B, S = tokens.shape
    k = min(cfg.index_topk, S)
    rp = cfg.rope_parameters
    inv_freq = model.model.rotary_emb.inv_freq.numpy()
    diag = {
        "yarn_ramp_low_high": yarn_correction_range(rp, cfg.qk_rope_head_dim),
        "yarn_inv_freq_max_rel_err_vs_numpy_f64": max_rel_err(inv_freq, yarn_inv_freq(rp, cfg.qk_rope_head_dim)),
        "mla_softmax_scale": model.model.layers[0].self_attn.scaling,
    }

    # Indexer: HF scores == reference scores; HF's valid picks == reference top-k; no near-ties at the cut.
    diag["indexer"] = {}
    t_idx = np.arange(S)
    for i, idx in hf["topk"].items():
        hs, rs = hf["scores"][i], ref["scores"][i]
        finite = np.isfinite(rs)
        assert np.array_equal(np.isfinite(hs), finite)
        picked = np.zeros((B, S, S), dtype=bool)
        np.put_along_axis(picked, idx.astype(np.int64), True, axis=-1)
        n_valid = np.minimum(t_idx + 1, k)
        valid_first = all(
            np.all(idx[b, t, : n_valid[t]] <= t) and np.all(idx[b, t, n_valid[t]:] > t) for b in range(B) for t in range(S)
        )
        assert valid_first, "valid keys are not the leading entries of HF's top-k rows"
        assert np.array_equal(picked & finite, ref["selected"][i]), f"layer {i}: top-k sets differ"
        ties = sum(len(row[np.isfinite(row)]) - len(np.unique(row[np.isfinite(row)])) for row in hs.reshape(-1, S))
        gap = boundary_gap(rs, k)
        assert gap > 1e-4, f"layer {i}: near-tie at the top-k boundary ({gap})"
        diag["indexer"][f"layer_{i}"] = {
            "scores_max_rel_err_vs_numpy_f64": max_rel_err(hs[finite], rs[finite]),
            "scores_std": float(hs[finite].std()),
            "exact_ties_within_rows": int(ties),
            "min_relative_gap_at_topk_boundary": gap,
            "rows_with_future_picks": int(np.sum(t_idx + 1 < k)) * B,
        }
        assert diag["indexer"][f"layer_{i}"]["scores_max_rel_err_vs_numpy_f64"] < 1e-5

    # Router: same experts and weights; bias and group limit both change some choices; all experts used.
    diag["routing"] = {}
    rc = {key: getattr(cfg, key) for key in ("n_group", "topk_group", "num_experts_per_tok", "norm_topk_prob",
                                           "routed_scaling_factor", "n_routed_experts")}
    for i, r in hf["routing"].items():
        rr = ref["routing"][i]
        assert np.array_equal(r["experts"], rr["experts"]), f"layer {i}: routed experts differ"
        bias = model.model.layers[i].mlp.gate.e_score_correction_bias.numpy().astype(np.float64)
        no_bias, _, _ = route(rc, rr["scores"], 0.0 * bias)
        no_groups, _, choice = route(rc, rr["scores"], bias, group_limited=False)
        _, _, masked_choice = route(rc, rr["scores"], bias)
        kk, G, kg = rc["num_experts_per_tok"], rc["n_group"], rc["topk_group"]
        s = -np.sort(-masked_choice, axis=-1)
        g = -np.sort(-np.sort(choice.reshape(len(choice), G, -1), axis=-1)[..., -2:].sum(-1), axis=-1)
        diag["routing"][f"layer_{i}"] = {
            "weights_max_rel_err_vs_numpy_f64": max_rel_err(r["weights"], rr["weights"]),
            "expert_use_counts": np.bincount(r["experts"].ravel(), minlength=rc["n_routed_experts"]).tolist(),
            "tokens_where_bias_changes_choice": int(np.any(no_bias != rr["experts"], axis=-1).sum()),
            "tokens_where_group_limit_changes_choice": int(np.any(no_groups != rr["experts"], axis=-1).sum()),
            "min_gap_at_expert_boundary": float(np.min(s[:, kk - 1] - s[:, kk])),
            "min_gap_at_group_boundary": float(np.min(g[:, kg - 1] - g[:, kg])),
            "e_score_correction_bias": bias.tolist(),
        }
        d = diag["routing"][f"layer_{i}"]
        assert d["weights_max_rel_err_vs_numpy_f64"] < 1e-5 and min(d["expert_use_counts"]) > 0, d
        assert d["tokens_where_bias_changes_choice"] > 0 and d["tokens_where_group_limit_changes_choice"] > 0, d
        assert min(d["min_gap_at_expert_boundary"], d["min_gap_at_group_boundary"]) > 1e-5, d

    logits = hf["logits"]
    diag["logits_std"] = float(logits.std())
    diag["logits_max_rel_err_vs_numpy_f64"] = max_rel_err(logits, ref["logits"])
    assert diag["logits_std"] > 0.3, diag
    assert diag["logits_max_rel_err_vs_numpy_f64"] < 1e-5, diag

    # The saved files reproduce the logits; HF's default kernels (sdpa, grouped_mm) agree.
    tok = torch.from_numpy(tokens).long()
    with torch.no_grad():
        eager = DeepseekV32ForCausalLM.from_pretrained(saved_dir, attn_implementation="eager",
                                                       experts_implementation="eager").eval()
        default = DeepseekV32ForCausalLM.from_pretrained(saved_dir).eval()
        reloaded = eager(input_ids=tok, use_cache=False).logits.numpy()
        default_logits = default(input_ids=tok, use_cache=False).logits.numpy()
    assert np.array_equal(reloaded, logits), "from_pretrained(saved dir) does not reproduce the logits"
    diag["default_impls"] = f"{default.config._attn_implementation}/{default.config._experts_implementation}"
    diag["logits_max_abs_diff_default_impls_vs_eager"] = float(np.max(np.abs(default_logits - logits)))
    return diag


# --------------------------------------------------------------------------------------------------
# Fixture writing
# --------------------------------------------------------------------------------------------------

NOTES = [
    "Produced by tests/golden/make_golden.py with HF transformers DeepseekV32ForCausalLM on CPU, float32, "
    "attn_implementation='eager', experts_implementation='eager', use_cache=False, no attention mask, "
    "position_ids = arange(S).",
    "Weights: random (see init_weights), not HF's default init; e_score_correction_bias is random and non-zero.",
    "logits.npy: every position [B, S, V].",
    "topk_indices.npz: output of each layer's self_attn.indexer (forward hook), int32 [B, S, index_topk], "
    "sorted by descending index score. For rows t < index_topk - 1 only the first t + 1 entries are real "
    "(all keys 0..t, sorted by score); the remaining index_topk - t - 1 entries are arbitrary future positions "
    "(masked scores tie at finfo(float32).min in eager mode, -inf in sdpa mode) and are removed again by the causal "
    "mask. Compare idx[b, t, :min(t + 1, index_topk)] as a set.",
    "index_scores.npz: the [B, S, S] tensor HF passes to topk (captured with a TorchFunctionMode during the indexer "
    "forward), with causally masked entries set to -inf: sum_h w[t,h] * relu(q[t,h].k[s] * index_head_dim^-0.5), "
    "w = weights_proj(x) * index_n_heads^-0.5.",
    "routing.npz: output of each MoE layer's mlp.gate (DeepseekV32TopkRouter) per token (b-major, [B*S]); experts "
    "sorted ascending with their weights (routed_scaling_factor included); logits = x @ gate.weight.T before sigmoid.",
    "Cross-checked against a float64 NumPy re-implementation that reads only config.json and model.safetensors "
    "(see diagnostics).",
]


def make_fixture(name: str, spec: dict) -> None:
    out_dir = GOLDEN_DIR / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir()

    model = build_model(spec["model"], spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    tokens = rng.integers(0, model.config.vocab_size, size=(BATCH, spec["seq_len"])).astype(np.int32)

    hf = hf_forward(model, tokens)
    model.save_pretrained(out_dir)
    ref = reference_forward(out_dir, tokens)
    diagnostics = check_and_describe(model, hf, ref, out_dir, tokens)

    np.save(out_dir / "tokens.npy", tokens)
    np.save(out_dir / "logits.npy", hf["logits"].astype(np.float32))
    np.savez(out_dir / "topk_indices.npz", **{f"layer_{i}": v for i, v in hf["topk"].items()})
    np.savez(out_dir / "index_scores.npz", **{f"layer_{i}": v for i, v in hf["scores"].items()})
    np.savez(out_dir / "routing.npz", **{f"layer_{i}_{k}": v for i, r in hf["routing"].items() for k, v in r.items()})
    meta = {
        "name": name,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
        "seed": spec["seed"],
        "batch": BATCH,
        "seq_len": spec["seq_len"],
        "config_kwargs": spec["model"],
        "init": {"router_std_gain": ROUTER_STD_GAIN, "score_bias_std": SCORE_BIAS_STD},
        "diagnostics": diagnostics,
        "notes": NOTES,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"{name}: wrote {out_dir} ({size / 1e6:.2f} MB)")
    print(json.dumps(diagnostics, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"fixtures to (re)generate, from {list(CONFIGS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := set(args.names) - set(CONFIGS):
        parser.error(f"unknown fixture(s): {sorted(unknown)}")
    torch.set_num_threads(1)  # deterministic reduction order
    for name in args.names or CONFIGS:
        make_fixture(name, CONFIGS[name])


if __name__ == "__main__":
    sys.exit(main())
