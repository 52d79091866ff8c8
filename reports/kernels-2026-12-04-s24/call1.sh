#!/bin/bash
# Session 24, call 1: the FP8 linears' tilings at the 671B attention projections, against session 23's kernel.
set -x
nvidia-smi --query-gpu=name --format=csv,noheader
rm -rf /tmp/old && mkdir /tmp/old && cp -r benchmarks dsv32_jax pallas_kernels /tmp/old/ \
  && cp .bench_old/grouped_gemm_fp8_mgpu_s23.py /tmp/old/pallas_kernels/grouped_gemm_fp8_mgpu.py
PYTHONPATH=. timeout 200 python3 benchmarks/fp8_linear_gpu.py --rows 131072 --iters 5 \
  --configs auto 64,128,2,4 128,256,2,4 128,256,2,3 128,128,2,4 --out $OUT/linears_128k.json
(cd /tmp/old && PYTHONPATH=. timeout 60 python3 benchmarks/fp8_linear_gpu.py --rows 131072 --iters 5 --no-reference \
  --configs auto --out $OUT/linears_128k_s23.json)
PYTHONPATH=. timeout 60 python3 benchmarks/fp8_linear_gpu.py --rows 4096 --iters 10 --configs auto 64,128,2,4 128,128,2,4 \
  --out $OUT/linears_4k.json
(cd /tmp/old && PYTHONPATH=. timeout 40 python3 benchmarks/fp8_linear_gpu.py --rows 4096 --iters 10 --no-reference \
  --configs auto)
timeout 200 python3 -m pytest -q -m gpu tests/test_grouped_gemm.py 2>&1 | tail -15
