#!/usr/bin/env bash
# device call (x2): GPU0 timed replay rows, GPU1 untimed checks. Usage: bash run_call.sh A|B|C
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T=benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz
call=$1
replay() {  # $1 budget, $2 out name
  timeout 555 python3 benchmarks/graph_h100.py --out $OUT/$2 --prompts 16 --families none --modes compiled \
      --trace $T --trace-budgets $1 --trace-only --evictions layer-distance lru --graph-prefetch none topk:1 \
      > $OUT/$2.log 2>&1; echo "$2 exit $?"
}
if [[ $call == A ]]; then
  (CUDA_VISIBLE_DEVICES=0 replay 5% rep5) &
  (export CUDA_VISIBLE_DEVICES=1
   SPECMD_TEST_DEVICE=cuda timeout 555 python3 -m pytest -q -rs -x tests/test_graph_engine.py tests/test_device_cache.py \
       tests/test_api.py tests/test_prefetch.py tests/test_concurrency.py tests/test_compute.py tests/test_replay.py \
       tests/test_from_config.py tests/test_loader.py tests/test_cli.py > $OUT/cuda-tests.log 2>&1
   echo "tests exit $? $(tail -n 1 $OUT/cuda-tests.log)") &
  wait
  grep -E "^(configuration|graph)" $OUT/rep5.log | cut -c1-150; grep -E "passed|failed|FAILED|Error" $OUT/cuda-tests.log | tail -15
fi
if [[ $call == B ]]; then
  (CUDA_VISIBLE_DEVICES=0 replay 10% rep10) &
  (export CUDA_VISIBLE_DEVICES=1
   SPECMD_TEST_DEVICE=cuda timeout 555 python3 -m pytest -q -rs tests/test_graph_engine.py tests/test_device_cache.py \
       tests/test_api.py tests/test_prefetch.py tests/test_concurrency.py tests/test_compute.py tests/test_replay.py \
       tests/test_from_config.py tests/test_loader.py tests/test_cli.py > $OUT/cuda-tests.log 2>&1
   echo "tests exit $? $(tail -n 1 $OUT/cuda-tests.log)") &
  wait
  grep -E "^(configuration|graph)" $OUT/rep10.log | cut -c1-150; grep -E "passed|failed|FAILED|Error" $OUT/cuda-tests.log | tail -15
fi
if [[ $call == C ]]; then
  (export CUDA_VISIBLE_DEVICES=0
   timeout 250 python3 benchmarks/graph_h100.py --out $OUT/g512 --prompts 512 --families none --budgets 10% \
       --modes compiled > $OUT/g512.log 2>&1; echo "g512 exit $?"
   SPECMD_TEST_DEVICE=cuda timeout 280 python3 -m pytest -q -rs tests/test_replay.py tests/test_compute.py \
       tests/test_from_config.py tests/test_cli.py tests/test_prefetch.py tests/test_concurrency.py > $OUT/cuda-tests2.log 2>&1
   echo "tests exit $? $(tail -n 1 $OUT/cuda-tests2.log)") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 280 python3 benchmarks/graph_h100.py --out $OUT/fam --families compiled --trace-only > $OUT/fam.log 2>&1
   echo "families exit $?"
   timeout 130 compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py graph > $OUT/memcheck.log 2>&1
   echo "memcheck exit $? $(grep 'ERROR SUMMARY' $OUT/memcheck.log)"
   timeout 130 compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > $OUT/racecheck.log 2>&1
   echo "racecheck exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.log | head -2)") &
  wait
  grep "pinned copy" $OUT/fam.log | cut -c1-400; grep -E "^(configuration|graph|full)" $OUT/g512.log | cut -c1-150
  grep -E "passed|failed|FAILED|Error" $OUT/cuda-tests2.log | tail -8
  grep -c identical $OUT/memcheck.log $OUT/racecheck.log
fi
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT
