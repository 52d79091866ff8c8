#!/bin/bash
# Session 28, call 2: after call 1, topk_bits_gpu keeps one block a row (its multi-block path failed on the H100 at
# 20480 values) and dispatch.topk_bits packs the top-k kernel's indices beyond; the kernel is the default. GPU tests:
# the kernel at 4096 / 4000 values a row and the dispatch at 20480, and the model's masked-kernel form with it.
export PYTHONPATH=.
timeout 90 python3 -m pytest -q -m gpu tests/test_topk_bits.py tests/test_model.py -k "bits or masked_kernel" -rf \
  --tb=short 2>&1 | grep -v -e ^WARNING -e ^I0000 -e ^W0000 -e DeprecationWarning -e "^ *return rule" | tail -12
