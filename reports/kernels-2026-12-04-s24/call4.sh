#!/bin/bash
# Session 24, call 4: the FP8 GEMM's tile order (rows first, as before, against Triton-style groups of 8 / 16 row
# blocks) for the side-by-side and stacked tilings at wo / wq_b; then the whole GPU test pass.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 150 python3 benchmarks/fp8_linear_gpu.py --rows 131072 --iters 5 --no-reference --only wo wq_b wq_a \
  --configs 64,128,2,4,0 64,128,2,4,8 64,128,2,4,16 128,256,2,4,0 128,256,2,4,8 128,256,2,4,16 \
  --out $OUT/call4_order_128k.json 2>&1 | grep -v $F
timeout 40 python3 benchmarks/fp8_linear_gpu.py --rows 4096 --iters 10 --no-reference --only wo wq_b \
  --configs 64,128,2,4,0 64,128,2,4,8 128,256,2,4,0 128,256,2,4,8 --out $OUT/call4_order_4k.json 2>&1 | grep -v $F
timeout 400 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -25
