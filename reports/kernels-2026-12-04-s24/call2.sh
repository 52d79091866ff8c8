#!/bin/bash
# Session 24, call 2: call 1 again with PYTHONPATH set for this tree (call 1's runs of it failed to import),
# the staging-aware pipeline depth; session 23's kernel was timed in call 1.
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout 200 python3 benchmarks/fp8_linear_gpu.py --rows 131072 --iters 5 \
  --configs auto 64,128,2,4 128,256,2,4 128,256,2,3 128,128,2,4 --out $OUT/linears_128k.json
PYTHONPATH=. timeout 60 python3 benchmarks/fp8_linear_gpu.py --rows 4096 --iters 10 --no-reference \
  --configs auto 64,128,2,4 128,256,2,4 128,128,2,4 --out $OUT/linears_4k.json
timeout 200 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py 2>&1 | tail -15
