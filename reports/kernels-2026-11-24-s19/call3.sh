# session 19, call 3: the producer's copies complete raw mbarriers (cp.async.mbarrier.arrive.noinc)
export PYTHONPATH=.
timeout 150 python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py -k mosaic 2>&1 | tail -3
(MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 reports/kernels-2026-11-24-s19/ptxas.py > $OUT/ptxas.log 2>&1; grep -E "=====|Used|spill" $OUT/ptxas.log)
timeout 100 python3 reports/kernels-2026-11-24-s19/timeline.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -30
timeout 300 python3 reports/kernels-2026-11-24-s19/diag2.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -20
