#!/bin/bash
# Session 23, call 5 (H200): the selection with and without the -inf fill, side by side; the 128K layer with
# this session's changes beside the dense baseline; the indexer kernels' GPU tests.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 120 python3 reports/kernels-2026-12-04-s23/selection_fill.py 2>&1 | grep -v $F
timeout 150 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call5_layer_128k.json 2>&1 | grep -v $F
timeout 230 python3 -m pytest -q -m gpu tests/test_indexer_kernels.py --tb=short 2>&1 | grep -v "^  warnings\|Warning" | tail -6
