#!/bin/bash
# Session 26, call 2: the masked-attention Mosaic GPU kernel against cuDNN at 4K (671B shapes); its GPU tests.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
nvcc --version 2>/dev/null | tail -2; python3 -c "import jax; print(jax.__version__)"
timeout 360 python3 benchmarks/masked_mha_gpu.py --out $OUT/call2_masked_mha.json 2>&1 | grep -v $F | tail -40
timeout 150 python3 -m pytest -q -m gpu tests/test_masked_mha.py -x -rf 2>&1 | grep -v $F | tail -15
timeout 100 python3 -m pytest -q -m gpu tests/test_model.py -k "masked_kernel or cudnn" -x -rf 2>&1 | grep -v $F | tail -8
