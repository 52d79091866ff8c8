F="-e Warning -e bfc_allocator -e ^W1 -e slow_operation -e Constant.folding -e This.isn -e If.you -e concatenate -e ^$ -e The.operation"
timeout 300 python3 -m pytest -q -m gpu tests/test_model.py tests/test_indexer_kernels.py tests/test_sparse_mla_gpu.py -rA > $OUT/call5_pytest_gpu.log 2>&1; echo "pytest rc $?"
grep -e PASSED -e FAILED -e "passed" -e "failed" $OUT/call5_pytest_gpu.log | tail -15
timeout 120 python3 benchmarks/layer_671b.py --prefill 8192 --attention-only --fp8 --decode-batch --iters 3 --prefill-form absorbed-gather --out $OUT/call5_layer_8k_gathered.json 2>&1 | grep -v $F
