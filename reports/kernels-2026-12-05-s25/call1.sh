#!/bin/bash
# Session 25, call 1: where the grouped tile order starts to pay (16K / 32K rows); the narrow projections
# (wkv_a, the indexer's wk) one warpgroup against stacked 128 x 128; the 128K layer against dense with the
# new defaults (group 16 from 16K rows); the cuDNN model test that failed in session 24's GPU pass.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 90 python3 benchmarks/fp8_linear_gpu.py --rows 16384 32768 --iters 5 --no-reference --only wo wq_b wq_a \
  --configs 64,128,2,4,0 64,128,2,4,16 --out $OUT/call1_order.json 2>&1 | grep -v $F
timeout 120 python3 benchmarks/fp8_linear_gpu.py --rows 4096 131072 --iters 5 --no-reference --only wkv_a indexer.wk \
  --configs auto 64,128,1,4,0 128,128,2,4,0 128,128,2,4,16 --out $OUT/call1_narrow.json 2>&1 | grep -v $F
timeout 90 python3 -m pytest -q -m gpu tests/test_model.py --tb=long 2>&1 | grep -v $F | tail -60
timeout 200 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch \
  --iters 5 --out $OUT/call1_layer_128k.json 2>&1 | grep -v $F
timeout 90 python3 reports/kernels-2026-12-05-s25/short_prefill.py 2>&1 | grep -v $F
