#!/usr/bin/env bash
# session 8 (the seventh H200 session) device calls (x2): GPU0 and GPU1 both timed ("shared").
# Usage: SPECMD_COMMIT=<commit> bash commands.sh A|B|... from the repo root. Call E set it; A-D did not, so
# their result files name the previous commit (the device's copy of the tree carried stale git metadata).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
call=$1
large() {  # $1 timeout, $2 name, $3 models, $4 budgets, $5 presets, $6 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/large-models.yaml --models $3 --budgets $4 --presets $5 \
      --baselines $6 --out $OUT/large-$2 > $OUT/large-$2.log 2>&1
  echo "large $2 exit $?"
}
if [[ $call == A ]]; then  # Qwen3-30B-A3B shapes on their own learned trace, one budget per GPU
  (export CUDA_VISIBLE_DEVICES=0; large 570 qwen3-5 qwen3-30b-a3b 5% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  (export CUDA_VISIBLE_DEVICES=1; large 570 qwen3-10 qwen3-30b-a3b 10% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  wait
  free -g | head -2
fi
if [[ $call == B ]]; then  # two more shapes, one per GPU, each on its own learned trace
  (export CUDA_VISIBLE_DEVICES=0; large 580 qwen15 qwen1.5-moe-a2.7b 5%,10% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  (export CUDA_VISIBLE_DEVICES=1; large 580 deepseek deepseek-v2-lite 5%,10% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  wait
fi
if [[ $call == C ]]; then  # GPT-OSS-20B shapes (bf16 experts, 48 MiB each), one budget per GPU
  (export CUDA_VISIBLE_DEVICES=0; large 580 gptoss-5 gpt-oss-20b 5% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  (export CUDA_VISIBLE_DEVICES=1; large 580 gptoss-10 gpt-oss-20b 10% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  wait
fi
bench() {  # $1 timeout, $2 name, $3 budget, $4 presets, $5 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/prefetch.yaml --budgets $3 --presets $4 --baselines $5 \
      --out $OUT/bench-$2 > $OUT/bench-$2.log 2>&1
  echo "bench $2 exit $?"
}
if [[ $call == D ]]; then  # the study's estimate: layer-distance without prefetch beats lru at 5% on this engine
  (export CUDA_VISIBLE_DEVICES=0; bench 400 ld5 5% layer-distance-noprefetch,lru-noprefetch,layer-distance-noprefetch none) &
  (export CUDA_VISIBLE_DEVICES=1; bench 400 ld10 10% lru-noprefetch,layer-distance-noprefetch,lru-noprefetch none) &
  wait
fi
if [[ $call == E ]]; then  # the graph engine through specmd bench on two more shapes (the device time left: ~5 min)
  (export CUDA_VISIBLE_DEVICES=0; large 260 graph-qwen15 qwen1.5-moe-a2.7b 5% lru-graph full-gpu-grouped-mm) &
  (export CUDA_VISIBLE_DEVICES=1; large 260 graph-deepseek deepseek-v2-lite 5% lru-graph full-gpu-grouped-mm) &
  wait
fi
for f in $OUT/*.log; do echo "== $f"; grep -vE "it/s\]|s/it\]" $f | tail -n 14 | cut -c1-220; done
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT

# On the CPU afterwards (no GPU), from the repository root (S=benchmarks/results/2026-11-30-h200/session8),
# after unpacking each call's all.tar.gz into $S/callA..callD:
#   python benchmarks/merge_bench.py $S/callA/large-qwen3-5/large-models.json $S/callA/large-qwen3-10/large-models.json \
#       $S/callB/large-qwen15/large-models.json $S/callB/large-deepseek/large-models.json \
#       $S/callC/large-gptoss-5/large-models.json $S/callC/large-gptoss-10/large-models.json --out $S/bench-large --stem large-models
#   python benchmarks/bench_counts.py $S/callA/large-qwen3-5/large-models.json --trace benchmarks/traces/trace-qwen3-30b-a3b-stdlib.json.gz \
#       --hardware h200-threaded-measured --transfer --out $S/bench-counts-qwen3-5.json | tee $S/bench-counts-qwen3-5.log
#   (the same for qwen3-10, qwen15, deepseek, gptoss-5 and gptoss-10 with their own traces)
#   python benchmarks/bench_counts.py $S/callD/bench-ld5/prefetch.json --trace benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz \
#       --hardware h200-threaded-measured --out $S/bench-counts-ld5.json | tee $S/bench-counts-ld5.log   (and ld10)
#   python benchmarks/readme_results.py
