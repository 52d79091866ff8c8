# session 21, call 5 (H200): decode at small batches again (call 1's batch-1 Mosaic GPU figure was 2.3x the H100's)
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e ^$"
timeout 250 python3 benchmarks/sparse_mla_mgpu_check.py --contexts --decode-batch 1 2 4 8 1 2>&1 | grep -v $F | grep decode
