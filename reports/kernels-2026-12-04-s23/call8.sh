#!/bin/bash
# Session 23, call 8 (H200): the 4K layer with this session's defaults (one 4096-query block, logits past the
# visible keys unwritten) beside the dense baseline.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 150 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call8_layer_4k.json 2>&1 | grep -v $F
