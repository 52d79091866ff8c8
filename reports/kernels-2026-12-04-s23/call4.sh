#!/bin/bash
# Session 23, call 4 (H200): wave quantisation of the query block: the kernels per query, then the 128K layer
# with 2048- (default), 2112- and 4224-query blocks beside the dense baseline.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 100 python3 reports/kernels-2026-12-04-s23/waves.py 2>&1 | grep -v $F
timeout 150 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call4_layer_128k.json 2>&1 | grep -v $F
for c in 2112 4224; do
timeout 75 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --fp8 --decode-batch --iters 3 --query-chunk $c --out $OUT/call4_layer_128k_chunk$c.json 2>&1 | grep -v $F
done
