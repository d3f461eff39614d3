#!/usr/bin/env bash
# session 9 (the eighth H200 session) device calls (x2): GPU0 and GPU1 both timed ("shared").
# Usage: SPECMD_COMMIT=<commit> bash commands.sh A|B|C from the repo root.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
call=$1
large() {  # $1 timeout, $2 name, $3 models, $4 budgets, $5 presets, $6 baselines
  timeout $1 python3 -m specmd.cli bench configs/bench/large-models.yaml --models $3 --budgets $4 --presets $5 \
      --baselines $6 --out $OUT/large-$2 > $OUT/large-$2.log 2>&1
  echo "large $2 exit $? at $(date +%T)"
}
date +%T
if [[ $call == A ]]; then  # Mixtral-8x7B on its own learned trace (32 decode steps a prompt), one budget per GPU
  (export CUDA_VISIBLE_DEVICES=0; large 570 mixtral-5 mixtral-8x7b 5% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  (export CUDA_VISIBLE_DEVICES=1; large 570 mixtral-10 mixtral-8x7b 10% lru-noprefetch,least-stale-topk full-gpu-grouped-mm) &
  sleep 300; free -g | head -2; wait
fi
if [[ $call == B ]]; then  # the graph engine's tokens on Qwen1.5 against the compiled full GPU; two shapes' baselines
  (export CUDA_VISIBLE_DEVICES=0; large 560 graph-qwen15 qwen1.5-moe-a2.7b 5% lru-graph full-gpu-grouped-mm,full-gpu-compiled) &
  (export CUDA_VISIBLE_DEVICES=1; large 560 base-qwen15-deepseek qwen1.5-moe-a2.7b,deepseek-v2-lite 5%,10% none \
      full-gpu-grouped-mm,on-demand,device-map-auto) &
  wait
fi
if [[ $call == C ]]; then  # two more shapes' on-demand and device_map="auto" baselines
  (export CUDA_VISIBLE_DEVICES=0; large 560 base-qwen3 qwen3-30b-a3b 5%,10% none full-gpu-grouped-mm,on-demand,device-map-auto) &
  (export CUDA_VISIBLE_DEVICES=1; large 560 base-gptoss gpt-oss-20b 5%,10% none full-gpu-grouped-mm,on-demand,device-map-auto) &
  wait
fi
for f in $OUT/*.log; do echo "== $f"; grep -vE "it/s\]|s/it\]|layer/s\]|s/layer\]" $f | tail -n 14 | cut -c1-220; done
cd $OUT && mkdir -p /tmp/keep && find . -name '*.json.gz' -exec mv {} /tmp/keep/ \; ; tar czf /tmp/all.tar.gz . && rm -rf $OUT/* && mv /tmp/all.tar.gz $OUT/; mv /tmp/keep/* $OUT/ 2>/dev/null; ls -la $OUT
