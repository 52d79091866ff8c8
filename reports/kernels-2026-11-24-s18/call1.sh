set -x
python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py -k mosaic 2>&1 | tail -15
python3 benchmarks/sparse_mla_mgpu_check.py --contexts 4096 131072 --decode-batch 1 32 2>&1 | tail -30
