# session 21, call 3 (H200): random vs sorted selections (the GPU top-k emits ascending indices) at 32K / 128K,
# and where one layer's 128K prefill attention goes, part by part
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 200 python3 benchmarks/sparse_mla_mgpu_check.py --contexts 32768 131072 --patterns random sorted --decode-batch 2>&1 | grep -v $F | tail -12
timeout 330 python3 benchmarks/attention_parts.py --prefill 131072 --fp8 --iters 3 --out $OUT/call3_parts.json 2>&1 | grep -v $F | tail -20
