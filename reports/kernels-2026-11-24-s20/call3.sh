# session 20, call 3: one epilogue per consumer (v1), and no cond around consumer 0's pairs (v2 = the module)
export PYTHONPATH=.
R=reports/kernels-2026-11-24-s20
timeout 420 python3 $R/compare.py s19=$R/sparse_mla_mgpu_s19.py v1=$R/sparse_mla_mgpu_v1.py v2=pallas_kernels/sparse_mla_mgpu.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -24
