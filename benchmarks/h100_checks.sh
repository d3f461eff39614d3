#!/usr/bin/env bash
# What a change to the CUDA path needs on the GPU before it is called done: memcheck and racecheck through the
# same code path, the CUDA run of the test files that touch streams, events, threads, pinned memory and the
# compiled graph engine, the link-emulation calibration, and the bench runner's smoke matrix (tokens checked
# against the full-GPU model; exit 2 if they differ). Logs under $OUT (or /tmp/h100-checks). The parts fit one
# 10-minute device call each (the whole took about 12 minutes on the H200):
#   bash benchmarks/h100_checks.sh [sanitizers] [tests] [bench]      # no argument: all three
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
if [[ " $parts " == *" bench "* ]]; then
    python3 benchmarks/calibrate_link.py 2>&1 | tee "$out/calibrate.log"
    timeout 240 python3 -m specmd.cli bench configs/bench/smoke.yaml --out "$out/smoke" > "$out/smoke.log" 2>&1
    echo "bench smoke: exit $?"; tail -n 8 "$out/smoke.log"
fi
