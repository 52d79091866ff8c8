#!/bin/bash
# Session 22, call 5 (H200): the GPU tests with room to finish (calls 3 and 4 cut them at 200-240 s), the
# failing cuDNN-form test with its traceback.
export PYTHONPATH=.
timeout 70 python3 -m pytest -q -m gpu tests/test_model.py -x --tb=short 2>&1 | grep -v "^  warnings\|Warning" | tail -30
timeout 60 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py 2>&1 | tail -3
timeout 230 python3 -m pytest -q -m gpu tests/test_indexer_kernels.py --durations=6 2>&1 | tail -12
