"""A probe, not part of the simulator: does a host-bound layer explain the threaded engine's live TPOT on the H200?
Model per decode layer: max(H, copies x expert / rate + T), the host's layer time H overlapping the layer's copies,
T the GPU's work after the last copy; copies from the threaded schedule (``simulate``, warm, the row's settings),
at the rate the rows' copies achieved (52.3-52.8 GB/s, ``copy_gbps_achieved``). Grid-fits H and T to this
session's rows without prefetch (worst error), then prices every native row of the learned-routing bench
results, the fifth session's held out. Run from the repository root:
    PYTHONPATH=. python benchmarks/results/2026-11-30-h200/session6/threaded-time-probe.py
"""
import json
import sys

import numpy as np

import specmd.study.sim as sim
from specmd.study.costmodel import LinkProfile, ModelTiming, Timeline
from specmd.study.trace import load_trace

sys.path.insert(0, "benchmarks")
from bench_counts import settings  # noqa: E402

R = "benchmarks/results/2026-11-30-h200/"
trace = load_trace("benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz")
model = ModelTiming.load("olmoe-1b-7b-0924")
loads: list[int] = []
RATE = 52.6


class Counting(Timeline):
    """Counts the copies issued before each compute call (a layer's, prefetches included)."""
    pending = 0

    def load(self, key, prefetch=False):  # prefetch: the simulator's flag since session 7 (unused here)
        Counting.pending += 1
        super().load(key, prefetch)

    def compute(self, keys, ms, host_ms=0.0):
        loads.append(Counting.pending)
        Counting.pending = 0
        return super().compute(keys, ms, host_ms)


sim.Timeline = Counting
P = len(trace.passes)
decode = [p for p in range(P) if p not in set(trace.prefill_passes)]
rows = []
for path in [R + "session6/bench-prefetch/prefetch.json", R + "session5/bench-default/default.json"]:
    for r in json.load(open(path))["rows"]:
        if "num_slots" not in r or r.get("link") != "native" or r["name"] == "on-demand":
            continue
        _, eviction, prefetch, lookahead, k = settings(r["name"])
        loads.clear()
        sim.simulate(trace, r["num_slots"], eviction, prefetch=prefetch, lookahead=lookahead, k=k, warm=True,
                     timing=(LinkProfile("x", 52.0, 0.0), model))
        per_layer = np.array(loads[P * trace.num_layers:]).reshape(P, trace.num_layers)[decode]
        copy_ms = model.expert_bytes / (RATE * 1e9) * 1e3
        rows.append((f"{r['name']} @ {r['budget']} ({path.split('/')[-3]})", prefetch, r["tpot_ms"],
                     per_layer * copy_ms))


def estimate(H, T, copies):
    return np.maximum(H, copies + T).sum(1).mean()


fitted = [r for r in rows if r[1] == "none" and "session6" in r[0]]
best = min(((max(abs(estimate(H, T, c) / tpot - 1) for _, _, tpot, c in fitted), H, T)
            for H in np.arange(0.8, 2.0, 0.01) for T in np.arange(0.0, 1.5, 0.01)))
worst, H, T = best
print(f"fitted to session 6's rows without prefetch: H {H:.2f} ms, T {T:.2f} ms, worst error {100 * worst:.1f}%")
for name, prefetch, tpot, copies in rows:
    est = estimate(H, T, copies)
    print(f"{name:<48}{prefetch:>6}{tpot:8.1f}{est:8.1f}{100 * (est / tpot - 1):+7.1f}%")
