#!/bin/bash
# Session 23, call 2 (H200): how much of the sparse MLA prefill is the row gather.
PYTHONPATH=. timeout 280 python3 reports/kernels-2026-12-04-s23/gather_bound.py 2>&1 | grep -v Warning
