#!/usr/bin/env bash
# session 6 device calls (x2): GPU0 and GPU1 both timed ("shared"). Usage: bash run6.sh A|B|C (run from the repo root)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T=benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz
call=$1
replay() {  # $1 timeout, $2 out name, then graph_h100 args
  local t=$1 name=$2; shift 2
  timeout $t python3 benchmarks/graph_h100.py --out $OUT/$name --prompts 16 --families none --modes compiled \
      --trace $T --trace-only "$@" > $OUT/$name.log 2>&1; echo "$name exit $?"
}
bench() {  # $1 timeout, $2 name, $3 budget, $4 presets, $5 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/prefetch.yaml --budgets $3 --presets $4 --baselines $5 \
      --out $OUT/bench-$2 > $OUT/bench-$2.log 2>&1
  echo "bench $2 exit $?"
}
if [[ $call == A ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   bench 360 p5-lru 5% lru-noprefetch,lru-topk,lru-topk-d2,lru-top-p full-gpu-grouped-mm
   bench 225 p25-lru 25% lru-noprefetch,lru-topk,lru-topk-d2,lru-top-p none) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 360 p5-ls 5% least-stale-noprefetch,least-stale-topk,least-stale-topk-d2,least-stale-top-p none
   bench 225 p25-ls 25% least-stale-noprefetch,least-stale-topk,least-stale-topk-d2,least-stale-top-p none) &
  wait
fi
if [[ $call == B ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   timeout 330 python3 benchmarks/graph_h100.py --out $OUT/g512-20 --prompts 512 --families none --budgets 20% \
       --modes compiled --graph-prefetch none topk:1::2 none topk:1::2 > $OUT/g512-20.log 2>&1; echo "g512-20 exit $?"
   timeout 235 python3 benchmarks/graph_h100.py --out $OUT/g512-hi --prompts 512 --families none --budgets 100% 50% \
       --modes compiled --graph-prefetch none topk:1::2 > $OUT/g512-hi.log 2>&1; echo "g512-hi exit $?") &
  (export CUDA_VISIBLE_DEVICES=1
   SPECMD_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -rs tests/test_graph_engine.py -k "side_stream or prefetch" \
       > $OUT/tests.log 2>&1; echo "tests exit $? $(tail -n 1 $OUT/tests.log)"
   timeout 400 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > $OUT/racecheck.log 2>&1
   echo "racecheck exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.log | head -2)"; grep -c identical $OUT/racecheck.log) &
  wait
fi
if [[ $call == C ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   replay 280 ho-ld --trace-budgets 5% 20% --evictions layer-distance --graph-prefetch topk:1::4
   replay 280 ho-lru --trace-budgets 10% 50% --evictions lru --graph-prefetch topk:1::2) &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 560 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > $OUT/racecheck.log 2>&1
   echo "racecheck exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.log | head -2)"; grep -c identical $OUT/racecheck.log) &
  wait
fi
for f in $OUT/*.log; do echo "== $f"; grep -E "^(configuration|graph|full)|exit|Error|error" $f | cut -c1-160 | tail -8; done
for f in $OUT/bench-*.log; do tail -n 12 $f | cut -c1-200; done
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT

# On the CPU afterwards (no GPU), from the repository root:
#   python benchmarks/merge_bench.py $S/callA/bench-p5-lru/prefetch.json $S/callA/bench-p5-ls/prefetch.json \
#       $S/callA/bench-p25-lru/prefetch.json $S/callA/bench-p25-ls/prefetch.json --out $S/bench-prefetch --stem prefetch
#   PYTHONPATH=. python $S/threaded-time-probe.py > $S/threaded-time-probe.log     # fits h200-threaded-measured
#   python benchmarks/bench_counts.py $S/bench-prefetch/prefetch.json --trace $T --hardware h200-threaded-measured \
#       --out $S/bench-counts.json > $S/bench-counts.log
#   python benchmarks/bench_counts.py $R/session5/bench-default/default.json --trace $T --hardware \
#       h200-threaded-measured --out $S/bench-counts-default-held-out.json > $S/bench-counts-default-held-out.log
#   python benchmarks/sim_vs_live.py <the 7 result files of the fit log's header> --trace $T --full-tpot-ms 4.60 \
#       --fit --profile-out F > $S/sim-vs-live-fit.log       # then h200-graph-measured = F
#   python benchmarks/sim_vs_live.py $S/callC/ho-ld/graph.json $S/callC/ho-lru/graph.json --trace $T \
#       --out $S/sim-vs-live-held-out.json > $S/sim-vs-live-held-out.log
#   python benchmarks/graph_prefetch_study.py --trace $T --evictions lru layer-distance --out $S/graph-prefetch-study
# (S=benchmarks/results/2026-11-30-h200/session6, R=benchmarks/results/2026-11-30-h200, T as above)
