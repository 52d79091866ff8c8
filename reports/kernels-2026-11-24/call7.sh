F="-e Warning -e bfc_allocator -e ^W1 -e slow_operation -e Constant.folding -e This.isn -e If.you -e concatenate -e ^$ -e The.operation"
timeout 250 python3 benchmarks/layer_671b.py --prefill 32768 131072 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call7_layer_auto.json 2>&1 | grep -v $F
