F="-e Warning -e bfc_allocator -e ^W1 -e slow_operation -e Constant.folding -e This.isn -e If.you -e concatenate -e ^$ -e The.operation"
timeout 150 python3 benchmarks/layer_671b.py --prefill 4096 8192 --attention-only --dense-baseline --fp8 --decode-batch --iters 5 --out $OUT/call6_layer_auto.json 2>&1 | grep -v $F
timeout 150 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --fp8 --decode-batch --iters 5 --prefill-form absorbed-gather --out $OUT/call6_layer_4k_gathered.json 2>&1 | grep -v $F
