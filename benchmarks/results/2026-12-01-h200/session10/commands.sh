#!/usr/bin/env bash
# session 10 (the ninth H200 session) device calls, one H200 (nothing else on the host: figures not shared).
# Usage: SPECMD_COMMIT=<commit> bash benchmarks/results/2026-12-01-h200/session10/commands.sh A|B|C from the repo root.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
call=$1
large() {  # $1 timeout, $2 name, $3 models, $4 budgets, $5 presets, $6 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/large-models.yaml --models $3 --budgets $4 --presets $5 \
      --baselines $6 --out $OUT/large-$2 > $OUT/large-$2.log 2>&1
  echo "large $2 exit $? at $(date +%T)"
}
date +%T
if [[ $call == A ]]; then  # the graph engine's tokens on Qwen1.5: engine or compilation? OLMoE as the control
  timeout 570 python3 benchmarks/graph_numerics.py --models qwen1.5-moe-a2.7b olmoe-1b-7b-0924 --budgets 5% 100% \
      --out $OUT/numerics > $OUT/numerics.log 2>&1
  echo "numerics exit $?"
fi
if [[ $call == A2 ]]; then  # the same with the bench's static cache length (640) and a replay before the check
  timeout 570 python3 benchmarks/graph_numerics.py --models qwen1.5-moe-a2.7b --budgets 5% --cache-len 640 \
      --replay benchmarks/traces/trace-qwen1.5-moe-a2.7b-stdlib.json.gz --out $OUT/numerics-replay \
      > $OUT/numerics-replay.log 2>&1
  echo "numerics-replay exit $?"
fi
if [[ $call == A3 ]]; then  # session 9's graph-engine bench row again, now recording where its tokens part
  large 570 graph-qwen15 qwen1.5-moe-a2.7b 5% lru-graph full-gpu-grouped-mm,full-gpu-compiled
fi
if [[ $call == A4 ]]; then  # graph_numerics on the bench's prompt, after the bench's whole replay sequence
  timeout 570 python3 benchmarks/graph_numerics.py --models qwen1.5-moe-a2.7b --budgets 5% --cache-len 640 \
      --replay benchmarks/traces/trace-qwen1.5-moe-a2.7b-stdlib.json.gz --bench-sequence --out $OUT/numerics-bench \
      > $OUT/numerics-bench.log 2>&1
  echo "numerics-bench exit $?"
fi
if [[ $call == B ]]; then  # Qwen3-30B-A3B's on-demand and device_map="auto" baselines
  large 570 base-qwen3 qwen3-30b-a3b 5%,10% none full-gpu-grouped-mm,on-demand,device-map-auto
fi
if [[ $call == C2 ]]; then  # GPT-OSS-20B's with the device time left (rows are written as they finish)
  large 330 base-gptoss gpt-oss-20b 5%,10% none full-gpu-grouped-mm,on-demand,device-map-auto
fi
if [[ $call == C ]]; then  # GPT-OSS-20B's
  large 570 base-gptoss gpt-oss-20b 5%,10% none full-gpu-grouped-mm,on-demand,device-map-auto
fi
for f in $OUT/*.log; do echo "== $f"; grep -vE "it/s\]|s/it\]|layer/s\]|s/layer\]" $f | tail -n 16 | cut -c1-240; done

# Calls run: A, A2, A3 (before the unreproducible-reference check, at 22bbc0c: callA3-before), A4, A3 (SPECMD_COMMIT
# said d57cb8d, a slip: the code was 3ca330e;
# callA3), C2. B and C were not run (device time). On the CPU afterwards, from the repository root
# (S8=benchmarks/results/2026-11-30-h200/session8, S9=.../session9, S=benchmarks/results/2026-12-01-h200/session10):
#   python benchmarks/merge_bench.py $S8/callA/large-qwen3-5/large-models.json $S8/callA/large-qwen3-10/large-models.json \
#       $S8/callB/large-qwen15/large-models.json $S8/callB/large-deepseek/large-models.json \
#       $S8/callC/large-gptoss-5/large-models.json $S8/callC/large-gptoss-10/large-models.json \
#       $S9/callA/large-mixtral-5/large-models.json $S9/callA/large-mixtral-10/large-models.json \
#       $S9/callB/large-base-qwen15-deepseek/large-models.json $S/callC2/large-base-gptoss/large-models.json \
#       $S/callA3/large-graph-qwen15/large-models.json --out $S/bench-large --stem large-models
#   python benchmarks/bench_counts.py $S9/callA/large-mixtral-5/large-models.json --trace benchmarks/traces/trace-mixtral-8x7b-stdlib.json.gz \
#       --hardware h200-threaded-measured --transfer --out $S/bench-counts-mixtral-5.json > $S/bench-counts-mixtral-5.log   (and 10)
#   python benchmarks/readme_results.py
#   python benchmarks/bench_counts.py $S9/callB/large-base-qwen15-deepseek/large-models.json --trace benchmarks/traces/trace-qwen1.5-moe-a2.7b-stdlib.json.gz \
#       --hardware h200-threaded-measured --transfer --out $S/bench-counts-ondemand-qwen1.5-moe-a2.7b.json > $S/bench-counts-ondemand-qwen1.5-moe-a2.7b.log
#   (the same for deepseek-v2-lite, and $S/callC2/large-base-gptoss/large-models.json with gpt-oss-20b)
