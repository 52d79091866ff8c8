#!/bin/bash
# Session 22, call 1 (hung at the 4-consumer tiling, removed after) and call 2: the indexer-logits tilings side by side (N = 2 queries x 64 heads per wgmma,
# warp-specialised consumers) and the GPU tests of the logits kernel.
set -x
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
PYTHONPATH=. timeout 200 python3 -m pytest -q -m gpu tests/test_indexer_kernels.py -k "logits_kernel_on_gpu" 2>&1 | tail -5
PYTHONPATH=. timeout 360 python3 benchmarks/indexer_gpu.py --logits-only --contexts 4096 32768 131072 --out $OUT/logits_sweep.json
