#!/bin/bash
# Session 27, call 2: with the masked-attention kernel the default on Hopper (dispatch.MASKED_MHA_BY_DEFAULT), the
# model's GPU tests and one 671B layer's attention at 4K with --kernels auto against the dense cuDNN baseline.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 75 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch \
  --kernels auto --iters 10 --out $OUT/call2_layer_4k_auto.json 2>&1 | grep -v $F | grep -i -e prefill -e error | tail -6
timeout 200 python3 -m pytest -q -m gpu tests/test_model.py -rf --tb=short 2>&1 | grep -v $F | tail -12
