#!/bin/bash
# Session 28, call 1: the top-k-as-bits kernel (pallas_kernels/topk_bits_gpu.py) on a GPU. Its GPU tests (against the
# reference's packed indices), then one 671B layer's attention at 4K against the dense cuDNN baseline with the bits
# kernel (dispatch.TOPK_BITS_BY_DEFAULT on) and, in the same call, with it off (the indices path, session 27's
# default); both with a fresh prefill's first index_topk queries computing no indexer queries (new this session).
# Last, the kernel's own benchmark against the indices path it replaces (checks first). Kept short: the device
# budget left after nine failed starts.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
python3 -c "import jax; print(jax.__version__, jax.devices()[0].device_kind)"
timeout 60 python3 -m pytest -q -m gpu tests/test_topk_bits.py -rf --tb=short 2>&1 | grep -v $F | tail -15
L="--prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --kernels auto --iters 10"
for bits in True False; do  # the bits kernel, then session 27's path (the top-k indices, scattered and packed)
  timeout 75 python3 -c "
import sys
from pallas_kernels import dispatch
dispatch.TOPK_BITS_BY_DEFAULT = $bits
sys.argv = ['layer_671b.py'] + '$L --out $OUT/call1_layer_4k_bits_$bits.json'.split()
import benchmarks.layer_671b as b
b.main()" 2>&1 | grep -v $F | grep -i -e prefill -e error | tail -6
done
timeout 50 python3 benchmarks/topk_bits_gpu.py --lengths 4096 --configs 4096,4 4096,8 --iters 5 \
  --out $OUT/call1_topk_bits.json 2>&1 | grep -v $F | tail -12
