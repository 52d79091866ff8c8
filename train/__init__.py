"""Training the lightning indexer of DeepSeek Sparse Attention: the V3.2 report's dense warm-up and sparse
stage, at a small scale, with a selector ablation harness (see docs/architecture.md, "Training the indexer").

Modules: ``selector`` (indexer variants, top-k / block selection), ``losses``, ``forward`` (the
differentiable full-sequence model), ``loop`` (optax / Orbax training), ``data`` (corpus, tokenizer),
``metrics``, ``recipe``, ``ablate``, ``presets``, ``report``.
"""
