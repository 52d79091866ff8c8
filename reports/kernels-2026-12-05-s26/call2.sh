#!/bin/bash
# Session 26, call 2: the masked-attention Mosaic GPU kernel against cuDNN at 4K (671B shapes); one 671B layer's
# attention at 4K with the kernel (kernels=pallas) against its dense cuDNN baseline; the kernel's GPU tests. Cut to
# fit the device time left after the session's failed starts (one tiling, no JAX attention_mgpu comparison).
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
python3 -c "import jax; print(jax.__version__, jax.devices()[0].device_kind)"
timeout 120 python3 benchmarks/masked_mha_gpu.py --tilings 128,2 --iters 3 --out $OUT/call2_masked_mha.json 2>&1 \
  | grep -v $F | tail -30
for k in pallas; do
  timeout 60 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch \
    --kernels $k --iters 10 --out $OUT/call2_layer_4k_$k.json 2>&1 | grep -v $F | grep prefill
done
timeout 90 python3 -m pytest -q -m gpu tests/test_masked_mha.py tests/test_model.py -k "masked or cudnn" -x -rf 2>&1 \
  | grep -v $F | tail -8
