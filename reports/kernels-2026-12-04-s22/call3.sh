#!/bin/bash
# Session 22, call 3 (H200): the logits kernel's long-context default (two queries a wgmma) and the FP8
# linears through the FP8 GEMM kernel -- GPU tests, the 128K parts (projections both ways), the layer.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 240 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py tests/test_model.py tests/test_indexer_kernels.py 2>&1 | tail -4
timeout 170 python3 benchmarks/attention_parts.py --prefill 131072 --fp8 --iters 3 --out $OUT/call3_parts.json 2>&1 | grep -v $F | tail -9
timeout 200 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call3_layer_128k.json 2>&1 | grep -v $F
timeout 80 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call3_layer_4k.json 2>&1 | grep -v $F
