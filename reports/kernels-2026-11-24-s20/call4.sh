# session 20, call 4: GPU tests, then the benchmark side by side (Triton vs Mosaic GPU; prefill random and
# window selections at 4K / 32K / 128K; decode device time at batch 1 / 4 / 8 / 32 / 128 over 128K caches)
export PYTHONPATH=.
timeout 200 python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py 2>&1 | tail -2
timeout 380 python3 benchmarks/sparse_mla_mgpu_check.py --decode-batch 1 4 8 32 128 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -30
