#!/bin/bash
# Session 27, call 1: the masked-attention Mosaic GPU kernel's first run on a GPU. Its GPU tests (the kernel's and
# the model's with it) first (their failures' tails), then the kernel against the float32 reference and cuDNN at 4K with two tilings, timed side by
# side with cuDNN causal/masked; then one 671B layer's attention at 4K with --kernels pallas (the kernel) and auto
# (cuDNN masked) against the dense cuDNN baseline.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
python3 -c "import jax; print(jax.__version__, jax.devices()[0].device_kind)"
timeout 170 python3 -m pytest -q -m gpu tests/test_masked_mha.py tests/test_model.py -k "masked" -x -rf --tb=short 2>&1 | grep -v $F | tail -40
timeout 190 python3 benchmarks/masked_mha_gpu.py --tilings 128,2 64,3 --iters 5 --out $OUT/call1_masked_mha.json 2>&1 \
  | grep -v $F | tail -30
for k in pallas auto; do
  timeout 75 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch \
    --kernels $k --iters 10 --out $OUT/call1_layer_4k_$k.json 2>&1 | grep -v $F | grep -i -e prefill -e error | tail -6
done
