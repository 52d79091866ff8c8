F="-e Warning -e bfc_allocator -e ^W1 -e slow_operation -e Constant.folding -e This.isn -e If.you -e concatenate -e ^$ -e The.operation"
timeout 150 python3 -m pytest -q -m gpu tests/test_model.py tests/test_indexer_kernels.py tests/test_sparse_mla_gpu.py -rA 2>&1 | grep -e PASS -e FAIL -e passed -e failed -e Error | head -20
timeout 80 python3 benchmarks/attention_parts.py --prefill 4096 --fp8 --iters 3 --out $OUT/call4_parts_4k.json 2>&1 | grep -v $F
timeout 300 python3 benchmarks/layer_671b.py --prefill 4096 8192 16384 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call4_layer_auto.json 2>&1 | grep -v $F
