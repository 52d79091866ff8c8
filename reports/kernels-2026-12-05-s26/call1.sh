#!/bin/bash
# Session 26, call 1 (session 25's call 2): the new defaults (narrow FP8 linears stacked 128 x 128; a fresh prefill's first index_topk
# queries select every visible key unscored) at 4K and 128K against dense; the GPU tests the change touches.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 60 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch \
  --iters 10 --out $OUT/call1_layer_4k.json 2>&1 | grep -v $F
timeout 150 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch \
  --iters 5 --out $OUT/call1_layer_128k.json 2>&1 | grep -v $F
timeout 330 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py tests/test_model.py tests/test_moe.py \
  "tests/test_indexer_kernels.py::test_model_with_kernels_is_as_accurate_as_the_reference_on_gpu" -rf --durations 5 \
  2>&1 | grep -v $F | tail -25
