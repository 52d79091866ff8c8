set -x
timeout 300 python3 benchmarks/attention_parts.py --prefill 4096 16384 32768 131072 --fp8 --iters 3 --out $OUT/call2_parts.json 2>&1 | grep -v Warning
timeout 200 python3 benchmarks/layer_671b.py --prefill 4096 16384 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call2_layer_official.json 2>&1 | grep -v Warning
