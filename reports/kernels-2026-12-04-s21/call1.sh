# session 21, call 1 (H200): GPU tests of the sparse MLA kernels, then the side-by-side benchmark
# (Triton vs Mosaic GPU; prefill random / window selections at 4K / 32K / 128K; decode device time at
# batch 1 / 4 / 8 / 32 / 128 over 128K caches)
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e ^$"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py 2>&1 | tail -2
timeout 360 python3 benchmarks/sparse_mla_mgpu_check.py --decode-batch 1 4 8 32 128 2>&1 | grep -v $F | tail -30
