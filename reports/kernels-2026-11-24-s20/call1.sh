# session 20, call 1 (second try): the register split side by side (the first try asked for more
# registers than the CTA's pool, 3 x 168 a thread, and hung; nvdisasm is missing, so no SASS)
export PYTHONPATH=.
timeout 400 python3 reports/kernels-2026-11-24-s20/regsplit.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -20
