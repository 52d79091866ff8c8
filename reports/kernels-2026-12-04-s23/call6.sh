#!/bin/bash
# Session 23, call 6 (H200): the 128K layer again (second sample of this session's state, beside the dense
# baseline), and with 4096-query blocks.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 150 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call6_layer_128k.json 2>&1 | grep -v $F
timeout 75 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --fp8 --decode-batch --iters 3 --query-chunk 4096 --out $OUT/call6_layer_128k_chunk4096.json 2>&1 | grep -v $F
