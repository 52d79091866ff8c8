set -x
python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py -k mosaic 2>&1 | tail -3
python3 benchmarks/sparse_mla_mgpu_check.py --contexts 4096 32768 131072 --decode-batch 1 32 --l2-prefetch 0 128 256 2>&1 | tail -30
