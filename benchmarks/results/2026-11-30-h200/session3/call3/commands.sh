#!/usr/bin/env bash
# third device call (x2): GPU0 timing (bounded prefetch gather), GPU1 tokens and sanitizers
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T=benchmarks/traces/trace-olmoe16x64-stdlib.json
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 80 python3 benchmarks/gather_programs.py --out $OUT/gather_programs.json > $OUT/gather_programs.log 2>&1
  echo "gather exit $?"
  timeout 280 python3 benchmarks/graph_h100.py --out $OUT/rep --prompts 16 --families none --budgets 100% \
      --modes compiled --graph-prefetch none topk:1 topk:1:66 --trace $T --trace-budgets 5% --trace-only \
      > $OUT/rep.log 2>&1; echo "replay exit $?"
  timeout 170 python3 benchmarks/graph_h100.py --out $OUT/g512 --prompts 512 --families none --budgets 100% 5% \
      --modes compiled > $OUT/g512.log 2>&1; echo "graph512 exit $?"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 330 python3 benchmarks/graph_h100.py --out $OUT/fam --families compiled --trace-only \
      > $OUT/fam.log 2>&1; echo "families exit $?"
  timeout 60 python3 benchmarks/sanitize_small.py graph > $OUT/plain-small.log 2>&1; echo "plain small exit $?"
  timeout 130 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > $OUT/racecheck.log 2>&1
  echo "racecheck exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.log | head -2)"
) &
wait
cat $OUT/gather_programs.log | tail -8; tail -n 4 $OUT/rep.log; tail -n 6 $OUT/g512.log; grep "pinned copy" $OUT/fam.log
grep identical $OUT/plain-small.log | cut -c1-90; grep -c identical $OUT/racecheck.log
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz /tmp/keep/* $OUT/ ; ls -la $OUT
