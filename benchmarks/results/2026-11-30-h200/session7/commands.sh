#!/usr/bin/env bash
# session 7 device calls (x2): GPU0 and GPU1 both timed ("shared"). Usage: bash commands.sh A|B|C|D|E|F (from the repo root)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T=benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz
call=$1
racecheck() {  # $1 timeout, $2 rows
  timeout $1 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph --rows $2 \
      > $OUT/racecheck-$2.log 2>&1
  echo "racecheck $2 exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck-$2.log | head -2)"
  grep -c "identical: True" $OUT/racecheck-$2.log
}
if [[ $call == A ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   timeout 150 python3 benchmarks/gather_variants.py --out $OUT/gather-variants.json > $OUT/gather-variants.log 2>&1
   echo "variants exit $?"
   racecheck 420 0-2) &
  (export CUDA_VISIBLE_DEVICES=1
   SPECMD_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -rs tests/test_graph_engine.py -k "side_stream or prefetch" \
       > $OUT/tests.log 2>&1; echo "tests exit $? $(tail -n 1 $OUT/tests.log)"
   racecheck 420 3-4) &
  wait
fi
memcheck() {  # $1 timeout, $2 rows
  timeout $1 compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py graph --rows $2 \
      > $OUT/memcheck-$2.log 2>&1
  echo "memcheck $2 exit $? $(grep -E 'ERROR SUMMARY' $OUT/memcheck-$2.log | head -1)"
  grep -c "identical: True" $OUT/memcheck-$2.log
}
replay() {  # $1 timeout, $2 out name, then graph_h100 args
  local t=$1 name=$2; shift 2
  timeout $t python3 benchmarks/graph_h100.py --out $OUT/$name --prompts 16 --families none --modes compiled \
      --trace $T --trace-only "$@" > $OUT/$name.log 2>&1; echo "$name exit $?"
}
if [[ $call == B ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   memcheck 270 0-2
   timeout 240 python3 benchmarks/graph_h100.py --out $OUT/api --prompts 16 --families none --modes compiled \
       --budgets 5% --graph-prefetch topk:1::2 --profile-budgets 5% > $OUT/api.log 2>&1; echo "api exit $?"
   for t in $OUT/api/trace-*.json.gz; do python3 benchmarks/step_api_calls.py $t > $OUT/api/$(basename $t .json.gz).calls.txt 2>&1; done
   tail -n 8 $OUT/api/*.calls.txt) &
  (export CUDA_VISIBLE_DEVICES=1
   memcheck 230 3-4
   replay 330 lru50 --trace-budgets 50% --evictions lru --graph-prefetch none topk:1::2) &
  wait
fi
bench() {  # $1 timeout, $2 name, $3 budget, $4 presets, $5 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/prefetch.yaml --budgets $3 --presets $4 --baselines $5 \
      --out $OUT/bench-$2 > $OUT/bench-$2.log 2>&1
  echo "bench $2 exit $?"
}
if [[ $call == C ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   bench 420 p10 10% lru-noprefetch,lru-topk,lru-topk-d2,least-stale-topk none) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 420 p20 20% lru-noprefetch,lru-topk,lru-topk-d2,least-stale-topk none) &
  wait
  for f in $OUT/bench-*.log; do tail -n 12 $f | cut -c1-200; done
fi
if [[ $call == D ]]; then  # least-stale against lru with top-k, alternating in one process per GPU
  (export CUDA_VISIBLE_DEVICES=0
   bench 330 alt20 20% least-stale-topk,lru-topk,least-stale-topk,lru-topk none) &
  (export CUDA_VISIBLE_DEVICES=1
   bench 330 alt10 10% lru-topk,least-stale-topk,lru-topk,least-stale-topk none) &
  wait
fi
if [[ $call == F ]]; then  # one-GPU host, alone: the gather sweep again after its timing helper moved
  timeout 150 python3 benchmarks/gather_variants.py --out $OUT/gather-variants-rerun.json > $OUT/gather-variants-rerun.log 2>&1
fi
if [[ $call == E ]]; then  # the threaded engine's inline prefetch (deterministic) at full size, 5% and 20%
  (export CUDA_VISIBLE_DEVICES=0; bench 250 inline5 5% least-stale-topk-inline none) &
  (export CUDA_VISIBLE_DEVICES=1; bench 250 inline20 20% least-stale-topk-inline none) &
  wait
fi
for f in $OUT/*.log; do echo "== $f"; grep -E "exit|Error|error|SUMMARY" $f | cut -c1-160 | tail -6; done
[ -f $OUT/gather-variants.log ] && tail -n 30 $OUT/gather-variants.log
for f in $OUT/*/graph.json; do [ -f $f ] && python3 -c "import json,sys; [print(r.get('name'), r.get('tpot_ms'), r.get('ttft_ms')) for r in json.load(open(sys.argv[1]))['rows']]" $f; done
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT

# On the CPU afterwards (no GPU), from the repository root (S=benchmarks/results/2026-11-30-h200/session7,
# R=benchmarks/results/2026-11-30-h200, T as above):
#   python benchmarks/sim_vs_live.py $S/callB/lru50/graph.json --trace $T --out $S/sim-vs-live-held-out.json \
#       > $S/sim-vs-live-held-out.log
#   PYTHONPATH=. python $S/threaded-prefetch-fit.py > $S/threaded-prefetch-fit.log   # the prefetch terms of
#       # h200-threaded-measured (host_predict_ms, host_prefetch_ms, prefetch_after_layer)
#   for b in p10 p20; do python benchmarks/bench_counts.py $S/callC/bench-$b/prefetch.json --trace $T \
#       --hardware h200-threaded-measured --out $S/bench-counts-$b-held-out.json > $S/bench-counts-$b-held-out.log; done
#   for b in inline5 inline20; do python benchmarks/bench_counts.py $S/callE/bench-$b/prefetch.json --trace $T \
#       --hardware h200-threaded-measured --out $S/bench-counts-$b.json > $S/bench-counts-$b.log; done
#   for b in alt10 alt20; do python benchmarks/bench_counts.py $S/callD/bench-$b/prefetch.json --trace $T \
#       --hardware h200-threaded-measured --out $S/bench-counts-$b-held-out.json > $S/bench-counts-$b-held-out.log; done
#   python benchmarks/bench_counts.py $R/session6/bench-prefetch/prefetch.json --trace $T --hardware \
#       h200-threaded-measured --out $S/bench-counts-session6.json > $S/bench-counts-session6.log
#   python benchmarks/bench_counts.py $R/session5/bench-default/default.json --trace $T --hardware \
#       h200-threaded-measured --out $S/bench-counts-session5.json > $S/bench-counts-session5.log
