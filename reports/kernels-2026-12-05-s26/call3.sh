#!/bin/bash
# Session 26, call 3: what the last of the session's device time allows (~100 s): the masked-attention
# benchmark alone, one tiling; whatever it prints before the limit.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 95 python3 benchmarks/masked_mha_gpu.py --tilings 128,2 --iters 3 --out $OUT/call3_masked_mha.json 2>&1 \
  | grep -v $F | tail -30
