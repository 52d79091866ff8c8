F="-e Warning -e bfc_allocator -e ^W1"
timeout 400 python3 benchmarks/attention_parts.py --prefill 4096 16384 32768 131072 --fp8 --iters 3 --out $OUT/call3_parts.json 2>&1 | grep -v $F
timeout 100 python3 benchmarks/layer_671b.py --prefill 4096 --attention-only --fp8 --decode-batch --iters 3 --out $OUT/call3_layer_official.json 2>&1 | grep -v $F
