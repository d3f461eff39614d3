"""How much to prefetch in the graph engine: its schedule in the simulator (``graph_sim.simulate_graph``,
whose counts equal the live engine's) with the graph cost model fitted to the H200's live replays, over
budgets x device evictions x prefetch {none, the trace's first K candidates one or two layers ahead}. The
step is link-bound at low budgets: a prefetch helps by the compute its copies hide and costs every copy the
layer does not use, so fewer candidates than top-k can win. Estimates, not measurements: one pair of rows
was measured live (README, "Third H200 session").

    python benchmarks/graph_prefetch_study.py --trace benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz \
        --evictions lru layer-distance --out benchmarks/results/2026-11-30-h200/session4/graph-prefetch-study
    python benchmarks/graph_prefetch_study.py --trace benchmarks/traces/trace-mixtral-8x7b-stdlib.json.gz \
        --counts-only --prefetch none 1:1 1:2 1:4 --out DIR/mixtral   # another topology: counts alone
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from specmd.study.costmodel import GraphLink, ModelTiming
from specmd.study.graph_sim import GraphTiming, simulate_graph
from specmd.study.trace import load_trace

OLMOE = ModelTiming.load("olmoe-1b-7b-0924")  # the expert's bytes of the replayed model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--out", required=True, help="writes OUT.jsonl (a row per setting, as it finishes) and OUT.md")
    parser.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--evictions", nargs="+", default=["lru", "layer-distance"])
    parser.add_argument("--prefetch", nargs="+", default=["none", "1:2", "1:4", "1:6", "1:8", "2:4", "2:8"],
                        help="none, or LOOKAHEAD:K (the trace's first K candidates)")
    parser.add_argument("--link", default="h200-graph-measured")
    parser.add_argument("--full-tpot-ms", type=float, default=None,
                        help="a compiled full-GPU TPOT (ms); / layers: a layer's compute in place of the profile's")
    parser.add_argument("--counts-only", action="store_true",
                        help="hits and copies alone (the cost model was fitted on OLMoE-1B-7B shapes only)")
    args = parser.parse_args()
    args.prefetch = ["none"] + [p for p in args.prefetch if p != "none"]  # the baseline of the copies column
    trace = load_trace(args.trace)
    total = trace.num_layers * trace.num_experts
    link = GraphLink.load(args.link)
    if args.full_tpot_ms is not None:
        link = dataclasses.replace(link, model=OLMOE.name, step_layer_ms=args.full_tpot_ms / trace.num_layers)
    elif link.step_layer_ms is None and not args.counts_only:
        parser.error(f"{args.link} has no step_layer_ms: give --full-tpot-ms (a compiled full-GPU step, ms)")
    timing = None if args.counts_only else GraphTiming(link, OLMOE)
    rows = []
    with open(f"{args.out}.jsonl", "w") as out:
        for budget in args.budgets:
            for eviction in args.evictions:
                for spec in args.prefetch:
                    depth, k = (1, None) if spec == "none" else map(int, spec.split(":"))
                    stats = simulate_graph(trace, max(1, total * budget // 100), eviction,
                                           "none" if spec == "none" else "topk", depth, k, warm=True, timing=timing)
                    row = {"budget": budget, "eviction": eviction, "prefetch": spec, "hit_rate": stats.hit_rate,
                           "copies": stats.total.misses + stats.total.prefetches,
                           "estimated_tpot_ms": stats.estimated_tpot_ms if timing else None}
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    what = "hit %, copies against no prefetch" if timing is None else (
        f"cost model `{args.link}`, compute {link.step_layer_ms * trace.num_layers:.2f} ms a step: estimated TPOT "
        "ms (hit %, copies against no prefetch); the best of each budget in bold")
    lines = [f"Graph schedule on `{Path(args.trace).name}`, {what}.", "",
             "| budget | eviction | " + " | ".join("no prefetch" if p == "none" else f"d{p.replace(':', ' top-')}"
                                                   for p in args.prefetch) + " |",
             "|---|---|" + "---|" * len(args.prefetch)]
    for budget in args.budgets:
        best = min(r["estimated_tpot_ms"] or 0.0 for r in rows if r["budget"] == budget)
        for eviction in args.evictions:
            cells = [r for r in rows if r["budget"] == budget and r["eviction"] == eviction]
            base = cells[0]["copies"]
            counts = [f"{100 * r['hit_rate']:.0f}%, {r['copies'] / base:.2f}x" for r in cells]
            if timing is not None:
                tpot = [f"{r['estimated_tpot_ms']:.2f}" for r in cells]
                tpot = [f"**{t}**" if r["estimated_tpot_ms"] == best else t for t, r in zip(tpot, cells)]
                counts = [f"{t} ({c})" for t, c in zip(tpot, counts)]
            lines.append(f"| {budget}% | {eviction} | " + " | ".join(counts) + " |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
