# session 21, call 2 (H200): one 671B layer's attention, DSA (kernels) against dense cuDNN, 4K and 128K
export PYTHONPATH=.
F="-e ^WARNING -e ^I0000 -e ^W0000 -e bfc_allocator -e slow_operation -e DeprecationWarning -e Constant.folding -e ^$"
timeout 150 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call2_layer_4k.json 2>&1 | grep -v $F
timeout 300 python3 benchmarks/layer_671b.py --prefill 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call2_layer_128k.json 2>&1 | grep -v $F
