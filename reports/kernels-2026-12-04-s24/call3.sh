#!/bin/bash
# Session 24, call 3: Nsight Compute on one FP8 GEMM launch (wo's shape, 32K rows; the side-by-side default and
# the stacked 128 x 256 tiling); the 128K layer against dense, 5 iterations.
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
which ncu; ncu --version | tail -1
for c in 64,128,4,2 128,256,4,2; do
  timeout 120 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
    python3 reports/kernels-2026-12-04-s24/gemm_ncu.py $c 2>&1 | grep -v $F | grep -v "^==PROF==" | tail -120
done
timeout 200 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch \
  --iters 5 --out $OUT/call3_layer_128k.json 2>&1 | grep -v $F
