#!/usr/bin/env bash
# session 5 device calls (x2): GPU0 and GPU1 both timed ("shared"). Usage: bash run5.sh A|B|C
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T=benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz
call=$1
replay() {  # $1 timeout, $2 out name, then graph_h100 args
  local t=$1 name=$2; shift 2
  timeout $t python3 benchmarks/graph_h100.py --out $OUT/$name --prompts 16 --families none --modes compiled \
      --trace $T --trace-only "$@" > $OUT/$name.log 2>&1; echo "$name exit $?"
}
bench() {  # $1 timeout, $2 part
  timeout $1 python3 -m specmd.cli bench run5/default-$2.yaml --out $OUT/bench-$2 > $OUT/bench-$2.log 2>&1
  echo "bench $2 exit $?"
}
if [[ $call == A ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   replay 330 pf10 --trace-budgets 10% --evictions layer-distance --graph-prefetch none topk:1::2 topk:1::4
   replay 215 pf20 --trace-budgets 20% --evictions layer-distance --graph-prefetch none topk:1::2) &
  (CUDA_VISIBLE_DEVICES=1 bench 550 a) &
  wait
fi
if [[ $call == B ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   replay 215 lru-high --trace-budgets 20% 50% --evictions lru --graph-prefetch none
   replay 330 ld50 --trace-budgets 50% --evictions layer-distance --graph-prefetch none topk:1::2) &
  (CUDA_VISIBLE_DEVICES=1 bench 550 b) &
  wait
fi
if [[ $call == C ]]; then
  (CUDA_VISIBLE_DEVICES=0 bench 550 c) &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 300 python3 benchmarks/graph_h100.py --out $OUT/fam --families compiled --trace-only > $OUT/fam.log 2>&1
   echo "families exit $?"
   SPECMD_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -rs tests/test_loader.py > $OUT/loader.log 2>&1
   echo "loader exit $? $(tail -n 1 $OUT/loader.log)"
   timeout 150 compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py graph > $OUT/memcheck.log 2>&1
   echo "memcheck exit $? $(grep 'ERROR SUMMARY' $OUT/memcheck.log)") &
  wait
  grep "pinned copy" $OUT/fam.log | cut -c1-400; grep -c identical $OUT/memcheck.log
fi
if [[ $call == D ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   timeout 400 python3 benchmarks/graph_h100.py --out $OUT/g512-20 --prompts 512 --families none --budgets 20% \
       --modes compiled --graph-prefetch none topk:1::2 --threaded 20% --threaded-prefetch none topk:1 > $OUT/g512-20.log 2>&1
   echo "g512-20 exit $?") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 400 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > $OUT/racecheck.log 2>&1
   echo "racecheck exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.log | head -2)"; grep -c identical $OUT/racecheck.log) &
  wait
fi
for f in $OUT/*.log; do echo "== $f"; grep -E "^(configuration|graph|full)|exit|Error|error" $f | cut -c1-160 | tail -8; done
for f in $OUT/bench-*.log; do tail -n 25 $f | cut -c1-200; done
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT
