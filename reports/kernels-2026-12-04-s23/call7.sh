#!/bin/bash
# Session 23, call 7 (H200): the top-k compaction over live segments only, against main; the top-k and
# logits kernels' GPU tests; the 128K layer beside the dense baseline.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 110 python3 reports/kernels-2026-12-04-s23/topk_compaction.py 2>&1 | grep -v $F
timeout 60 python3 -m pytest -q -m gpu tests/test_indexer_kernels.py -k "topk_kernel_on_gpu or logits_kernel_on_gpu" 2>&1 | tail -1
timeout 120 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call7_layer_128k.json 2>&1 | grep -v $F
