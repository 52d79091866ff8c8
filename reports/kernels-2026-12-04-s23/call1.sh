#!/bin/bash
# Session 23, call 1 (H200): the GPU tests left unverified by session 22; the latent absorb / expand layouts.
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 reports/kernels-2026-12-04-s23/layout.py 2048 2>&1 | grep -v Warning
timeout 150 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py tests/test_model.py -x --tb=short 2>&1 | grep -v "^  warnings\|Warning" | tail -15
timeout 300 python3 -m pytest -q -m gpu tests/test_indexer_kernels.py --durations=5 --tb=short 2>&1 | grep -v "^  warnings\|Warning" | tail -25
