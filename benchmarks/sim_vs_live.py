"""The simulator's time estimate against the graph engine's live replays (issue 12, the cost model), from
committed result files: no GPU needed.

For each replayed row of a ``graph_h100.py`` result (``--trace``), the simulator replays the same trace
at the same budget, eviction and prefetch, with the cost model's constants taken from that run alone: the
link rate is the copy rate the run measured (``copy_gbps``), with no per-copy overhead (the gather kernel
is one launch per layer), and a layer's compute is the compiled full-GPU decode step of a run on the same
machine divided by the MoE layers (``--full-tpot-ms``; the replayed runs time no full-GPU row). Prints, per
row: live and estimated TPOT, the error, and the hit rates of both (the graph engine does not predict the
next pass's first layers, the simulator's inline prefetch does, so their counts differ with prefetch).

    python benchmarks/sim_vs_live.py RESULT.json [RESULT.json ...] --trace T --full-tpot-ms 5.05 [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import re

from specmd.study.costmodel import LinkProfile, ModelTiming
from specmd.study.sim import simulate
from specmd.study.trace import load_trace

OLMOE = ModelTiming.load("olmoe-1b-7b-0924")  # the replayed model's shapes: its expert's bytes

def row_settings(name: str) -> tuple[str, float, str, int, int | None]:
    """(eviction, budget %, prefetch policy, lookahead, gather programs) from a replayed row's name, e.g.
    'graph lru @ 5% (compiled, topk d1 p66 from the trace, replayed trace)'."""
    match = re.match(r"graph (\S+) @ ([\d.]+)% \((.*)\)$", name)
    if match is None:
        raise ValueError(f"not a replayed graph row: {name!r}")
    eviction, budget, mode = match[1], float(match[2]), match[3]
    prefetch = re.search(r"(topk) d(\d)(?: p(\d+))?", mode)
    if prefetch is None:
        return eviction, budget, "none", 1, None
    return eviction, budget, prefetch[1], int(prefetch[2]), int(prefetch[3]) if prefetch[3] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--full-tpot-ms", type=float, required=True,
                        help="the compiled full-GPU TPOT of a run on the same machine (ms)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trace = load_trace(args.trace)
    total = trace.num_layers * trace.num_experts
    layer_ms = args.full_tpot_ms / trace.num_layers
    rows = []
    for path in args.results:
        result = json.load(open(path))
        link = LinkProfile("measured", result["copy_gbps"], 0.0)
        timing = ModelTiming("olmoe", OLMOE.expert_bytes, layer_ms, 0.0)
        for live in result["rows"]:
            if "replayed trace" not in live.get("name", "") or "error" in live:
                continue
            eviction, budget, prefetch, depth, programs = row_settings(live["name"])
            capacity = int(total * budget / 100)
            sim = simulate(trace, capacity, eviction, prefetch=prefetch, lookahead=depth, timing=(link, timing))
            rows.append({"file": path, "name": live["name"], "copy_gbps": result["copy_gbps"],
                         "live_tpot_ms": live["tpot_ms"], "sim_tpot_ms": sim.estimated_tpot_ms,
                         "error": sim.estimated_tpot_ms / live["tpot_ms"] - 1, "live_hit_rate": live["hit_rate"],
                         "sim_hit_rate": sim.hit_rate})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trace": args.trace, "full_tpot_ms": args.full_tpot_ms, "rows": rows}, f, indent=1)
    print(f"layer compute {layer_ms:.3f} ms (compiled full GPU {args.full_tpot_ms} ms / {trace.num_layers}); "
          "link: each run's measured copy rate, no per-copy overhead")
    print(f"{'row':<72}{'GB/s':>6}{'live ms':>9}{'sim ms':>8}{'error':>8}{'hit live/sim':>15}")
    for r in rows:
        print(f"{r['name']:<72}{r['copy_gbps']:>6.1f}{r['live_tpot_ms']:>9.2f}{r['sim_tpot_ms']:>8.2f}"
              f"{100 * r['error']:>+7.1f}%{100 * r['live_hit_rate']:>8.1f}/{100 * r['sim_hit_rate']:.1f}")


if __name__ == "__main__":
    main()
