#!/bin/bash
# Session 23, call 3 (H200): named barriers in the sparse MLA kernel against mbarriers; its GPU tests.
export PYTHONPATH=.
timeout 200 python3 reports/kernels-2026-12-04-s23/named_barriers.py 2>&1 | grep -v Warning
timeout 200 python3 -m pytest -q -m gpu tests/test_sparse_mla_gpu.py --tb=short 2>&1 | grep -v "^  warnings\|Warning" | tail -8
