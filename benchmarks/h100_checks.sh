#!/usr/bin/env bash
# What a change to the CUDA path needs on the GPU before it is called done (a few minutes on an H100):
# memcheck and racecheck through the same code path, the CUDA run of the test files that touch streams,
# events and threads, the link-emulation calibration, and the bench runner's smoke matrix (tokens checked
# against the full-GPU model; exit 2 if they differ). Logs under $OUT (or /tmp/h100-checks).
#   bash benchmarks/h100_checks.sh
set -u
out=${OUT:-/tmp/h100-checks}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
compute-sanitizer --tool memcheck python3 benchmarks/sanitize_small.py > "$out/memcheck.log" 2>&1
echo "memcheck: exit $? ($(grep 'ERROR SUMMARY' "$out/memcheck.log"))"
compute-sanitizer --tool racecheck python3 benchmarks/sanitize_small.py > "$out/racecheck.log" 2>&1
echo "racecheck: exit $? ($(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck.log" | head -1))"
SPECMD_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q tests/test_api.py tests/test_prefetch.py \
    tests/test_concurrency.py tests/test_compute.py tests/test_replay.py tests/test_from_config.py \
    tests/test_graph_engine.py tests/test_cli.py > "$out/cuda-tests.log" 2>&1
echo "CUDA tests: exit $? ($(tail -n 1 "$out/cuda-tests.log"))"
python3 benchmarks/calibrate_link.py 2>&1 | tee "$out/calibrate.log"
timeout 240 python3 -m specmd.cli bench configs/bench/smoke.yaml --out "$out/smoke" > "$out/smoke.log" 2>&1
echo "bench smoke: exit $?"; tail -n 8 "$out/smoke.log"
