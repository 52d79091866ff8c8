# session 20, call 2: what bounds the prefill (random vs window indices vs no row copies); ptxas per register split
export PYTHONPATH=.
timeout 400 python3 reports/kernels-2026-11-24-s20/bound.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -20
