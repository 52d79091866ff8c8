#!/bin/bash
# Session 22, call 4 (H200): the GPU tests after the logits-kernel and FP8-linear changes (call 3's pytest ran
# past its timeout), the layer at 128K again (2048- and 4096-query blocks), one more logits tiling at 128K.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 200 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py tests/test_indexer_kernels.py 2>&1 | tail -3
timeout 150 python3 -m pytest -q -m gpu tests/test_model.py 2>&1 | tail -3
timeout 60 python3 benchmarks/indexer_gpu.py --logits-only --contexts 131072 --configs q2/kv128 q4/kv128/n128/serial q8/kv128/n128/serial 2>&1 | grep "logits kernel"
timeout 130 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call4_layer_128k.json 2>&1 | grep -v $F
timeout 70 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --fp8 --decode-batch --iters 3 --query-chunk 4096 --out $OUT/call4_layer_128k_chunk4096.json 2>&1 | grep -v $F
