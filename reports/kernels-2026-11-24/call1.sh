set -x
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu tests/test_model.py -k cudnn -rA 2>&1 | tail -5
timeout 230 python3 benchmarks/layer_671b.py --prefill 4096 16384 32768 --attention-only --dense-baseline --fp8 --decode-batch --iters 3 --out $OUT/call1_layer_official.json 2>&1 | grep -v Warning
timeout 200 python3 benchmarks/layer_671b.py --prefill 4096 16384 32768 --attention-only --fp8 --decode-batch --iters 3 --prefill-form absorbed-gather --out $OUT/call1_layer_gathered.json 2>&1 | grep -v Warning
