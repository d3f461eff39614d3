#!/usr/bin/env bash
# fourth call (one-GPU H200, alone): the trace's top-2 candidates one layer ahead against no prefetch, layer-distance, 5%
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 195 python3 benchmarks/graph_h100.py --out $OUT/k2 --prompts 16 --families none --modes compiled \
    --trace benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz --trace-budgets 5% --trace-only \
    --evictions layer-distance --graph-prefetch topk:1::2 none > $OUT/k2.log 2>&1
