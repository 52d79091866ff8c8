F="-e Warning -e bfc_allocator -e ^W1 -e slow_operation -e Constant.folding -e This.isn -e If.you -e concatenate -e ^$ -e The.operation -e DeprecationWarning"
timeout 150 python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py 2>&1 | tail -3
timeout 120 python3 benchmarks/sparse_mla_mgpu_check.py --contexts --decode-batch 1 32 128 2>&1 | grep -v $F | tail -8
timeout 150 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call4_layer_4k.json 2>&1 | grep -v $F
timeout 250 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call4_layer_128k.json 2>&1 | grep -v $F
