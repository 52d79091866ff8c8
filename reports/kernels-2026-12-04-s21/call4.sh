# session 21, call 4 (H200): the Hadamard rotation as a bf16 product with float32 sums, weights_proj without
# widening x, queries absorbed a block at a time -- GPU tests of the model, the parts at 128K, the layer
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 200 python3 -m pytest -q -m gpu tests/test_model.py tests/test_indexer_kernels.py 2>&1 | tail -2
timeout 150 python3 benchmarks/attention_parts.py --prefill 131072 --fp8 --iters 3 --out $OUT/call4_parts.json 2>&1 | grep -v $F | tail -8
timeout 100 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call4_layer_4k.json 2>&1 | grep -v $F
timeout 200 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call4_layer_128k.json 2>&1 | grep -v $F
