#!/bin/bash
# Session 22, call 1 (hung at the 4-consumer tiling, removed after) and call 2: the indexer-logits tilings side by side (N = 2 queries x 64 heads per wgmma,
# warp-specialised consumers) and the GPU tests of the logits kernel.
set -x
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
PYTHONPATH=. timeout 360 python3 benchmarks/indexer_gpu.py --logits-only --contexts 4096 32768 131072 --configs q2/kv128 q4/kv64/n128 q4/kv128/n128/serial q8/kv64/n256/serial ws2/q4/kv128 ws2/q4/kv64/n128/serial ws2/q8/kv64/n128 ws2/q8/kv64/n128/4steps ws3/q6/kv64/n128/serial --out $OUT/logits_sweep.json
