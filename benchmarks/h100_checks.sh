#!/usr/bin/env bash
# What a change to the CUDA path needs on the GPU before it is called done: memcheck and racecheck through the
# same code path, the CUDA run of the test files that touch streams, events, threads, pinned memory and the
# compiled graph engine, the link-emulation calibration, and the bench runner's smoke matrix (tokens checked
# against the full-GPU model; exit 2 if they differ). Logs under $OUT (or /tmp/h100-checks). The parts fit one
# 10-minute device call each (the whole took about 12 minutes on the H200):
#   bash benchmarks/h100_checks.sh [sanitizers] [tests] [bench]      # no argument: these three
#   bash benchmarks/h100_checks.sh graph16-high | graph16-low | graph512-high | graph512-low | replay-low |
#       replay-high |
#       prefetch | prefetch-d2 | families | load  # the issues' GPU figures, one call each
#   bash benchmarks/h100_checks.sh bench-default-5 | bench-default-10 | bench-default-20 | bench-prefetch-5 |
#       bench-prefetch-25   # the bench matrices on learned routing, one budget a call (merge_bench.py joins them)
# On a two-GPU machine, run a timed part on one GPU and an untimed one (tests, sanitizers) on the other:
#   (CUDA_VISIBLE_DEVICES=0 bash benchmarks/h100_checks.sh graph16-high &); CUDA_VISIBLE_DEVICES=1 bash ... tests
# (the host's CPUs are shared: timed rows read higher then; say so with their figures). $OUT returns at most 8
# files: tar the logs (2026-11-30: `cd $OUT && tar czf all.tar.gz . `, then remove the rest).
set -u
out=${OUT:-/tmp/h100-checks}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
parts=${*:-sanitizers tests bench}
if [[ " $parts " == *" sanitizers "* ]]; then
    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py > "$out/memcheck.log" 2>&1
    echo "memcheck: exit $? ($(grep 'ERROR SUMMARY' "$out/memcheck.log"))"
    # racecheck looks for shared-memory hazards: the graph engine's rows run the project's Triton kernels (the
    # threaded rows only torch's, and take minutes under racecheck)
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py graph > "$out/racecheck.log" 2>&1
    echo "racecheck: exit $? ($(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck.log" | head -1))"
fi
if [[ " $parts " == *" tests "* ]]; then
    SPECMD_TEST_DEVICE=cuda timeout 540 python3 -m pytest -q -rs tests/test_api.py tests/test_prefetch.py \
        tests/test_concurrency.py tests/test_compute.py tests/test_replay.py tests/test_from_config.py \
        tests/test_graph_engine.py tests/test_device_cache.py tests/test_loader.py tests/test_cli.py \
        > "$out/cuda-tests.log" 2>&1
    echo "CUDA tests: exit $? ($(tail -n 1 "$out/cuda-tests.log"))"
fi
# Issue 11's table (OLMoE shapes), one part per prompt length and budget group (each compiled row takes 40-60 s
# to compile and time: a part of 15 rows did not fit a 10-minute call), and issue 13's load
for prompt in 16 512; do
    for group in high low; do
        [[ " $parts " == *" graph$prompt-$group "* ]] || continue
        if [[ $group == high ]]; then budgets="100% 50% 20%"; threaded=""; else
            budgets="10% 5%"; threaded="--threaded 10% 5% --threaded-prefetch none topk:1"; fi
        timeout 580 python3 benchmarks/graph_h100.py --out "$out/graph$prompt-$group" --prompts $prompt \
            --families none --budgets $budgets --modes compiled --graph-prefetch none topk:1 topk:2 $threaded \
            > "$out/graph$prompt-$group.log" 2>&1
        echo "graph $prompt $group: exit $?"; tail -n 14 "$out/graph$prompt-$group.log"
    done
done
# Learned routing replayed (the OLMoE-topology trace and its recorded candidates). layer-distance: the
# simulator's best eviction without prefetch at 5-10% on this trace (31.7% hits at 5%, 68.4% at 10%, where
# lru has 0%), never measured live.
T=benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz
for group in low high; do  # each row about 100 s (508 decode steps, 4 prefills of 128-512 tokens)
    [[ " $parts " == *" replay-$group "* ]] || continue
    if [[ $group == low ]]; then budgets="5% 10%"; else budgets="20% 50%"; fi
    timeout 580 python3 benchmarks/graph_h100.py --out "$out/replay-$group" --prompts 16 --families none \
        --modes compiled --trace $T --trace-budgets $budgets --trace-only --evictions lru layer-distance \
        --graph-prefetch none > "$out/replay-$group.log" 2>&1
    echo "replay $group: exit $?"; tail -n 6 "$out/replay-$group.log"
done
if [[ " $parts " == *" prefetch "* ]]; then  # the bounded prefetch gather; how much to prefetch on the learned trace
    timeout 80 python3 benchmarks/gather_programs.py --out "$out/gather_programs.json" > "$out/gather_programs.log" 2>&1
    echo "gather programs: exit $?"; tail -n 8 "$out/gather_programs.log"
    # two or four candidates a layer: what a layer's compute hides (the graph cost model's best at 5-20%; the
    # pair at 5% with layer-distance measured 0.96x no prefetch, eight candidates 1.13x)
    timeout 480 python3 benchmarks/graph_h100.py --out "$out/prefetch" --prompts 16 --families none --modes compiled \
        --trace $T --trace-budgets 10% --trace-only --evictions layer-distance --graph-prefetch none topk:1::2 topk:1::4 \
        > "$out/prefetch.log" 2>&1
    echo "prefetch: exit $?"; tail -n 8 "$out/prefetch.log"
fi
if [[ " $parts " == *" prefetch-d2 "* ]]; then  # lookahead 2, and the prefetch gather on other grids
    timeout 580 python3 benchmarks/graph_h100.py --out "$out/prefetch-d2" --prompts 16 --families none \
        --modes compiled --trace $T --trace-budgets 5% --trace-only --graph-prefetch topk:2 topk:1:16 topk:1:66 \
        > "$out/prefetch-d2.log" 2>&1
    echo "prefetch d2: exit $?"; tail -n 8 "$out/prefetch-d2.log"
fi
if [[ " $parts " == *" families "* ]]; then  # every family's tiny bf16 model, tokens only (uncompiled and compiled)
    timeout 580 python3 benchmarks/graph_h100.py --out "$out/families" --families both --trace-only \
        > "$out/families.log" 2>&1
    echo "families: exit $?"; grep "pinned copy" "$out/families.log"
fi
if [[ " $parts " == *" load "* ]]; then
    timeout 580 python3 benchmarks/load_h100.py --dir /tmp/olmoe-ckpt --out "$out/load" > "$out/load.log" 2>&1
    echo "load: exit $?"; tail -n 12 "$out/load.log"
fi
# The headline matrices replay the learned trace: about 20 minutes each in all, so one budget a call (6-8 min).
# On two GPUs a budget splits further by preset (`specmd bench ... --presets lru-noprefetch,lru-topk,...`), as
# benchmarks/results/2026-11-30-h200/session6/commands.sh ran the prefetch matrix (3-4 min a part)
declare -A part_baselines=([default-5]=full-gpu,full-gpu-grouped-mm,device-map-auto [default-10]=device-map-auto
    [default-20]=on-demand,device-map-auto [prefetch-5]=full-gpu-grouped-mm [prefetch-25]=none)
for part in default-5 default-10 default-20 prefetch-5 prefetch-25; do
    [[ " $parts " == *" bench-$part "* ]] || continue
    timeout 580 python3 -m specmd.cli bench "configs/bench/${part%-*}.yaml" --budgets "${part##*-}%" \
        --baselines "${part_baselines[$part]}" --out "$out/bench-$part" > "$out/bench-$part.log" 2>&1
    echo "bench $part: exit $?"; tail -n 12 "$out/bench-$part.log"
done
if [[ " $parts " == *" bench "* ]]; then
    python3 benchmarks/calibrate_link.py 2>&1 | tee "$out/calibrate.log"
    timeout 240 python3 -m specmd.cli bench configs/bench/smoke.yaml --out "$out/smoke" > "$out/smoke.log" 2>&1
    echo "bench smoke: exit $?"; tail -n 8 "$out/smoke.log"
fi
