"""The simulator against the graph engine's live replays (issue 12): counts and time, from committed result
files; no GPU needed.

For each replayed row (compiled) of a ``graph_h100.py`` result (``--trace``), ``graph_sim.GraphSchedule`` replays the
same trace through the graph engine's own device cache at the same budget, eviction and prefetch, as the live
row did: a warm-up replay, the counted one (counts, TPOT), then the prompts' prefills alone (TTFT). Prints, per
row: whether every per-layer count equals the live one
(hits, misses by kind, prefetch hits, prefetches, evictions, wasted prefetches), and live against estimated
TPOT and TTFT. The estimate is the graph cost model (``graph_sim.GraphTiming``) with a ``GraphLink`` profile's
gather rates and compute (``--full-tpot-ms``: a layer's compute = that compiled full-GPU step / MoE layers
instead of the profile's).

``--fit`` searches the decode step's constants (miss gather GB/s, prefetch gather GB/s, overhead per layer, a
layer's compute: a fraction of ``--full-tpot-ms`` / layers, default 4.6 ms) for the smallest worst TPOT error
over the given rows, then the prefill's (a layer call's fixed cost, its cost per token, a chunked call's
extra) for the smallest worst TTFT error with the fitted gather rate, prints them, prices the rows with
them, and with ``--profile-out`` writes them as a graph link profile (to check on rows not in the fit).

    python benchmarks/sim_vs_live.py RESULT.json [...] --trace T [--link NAME] [--full-tpot-ms MS] [--fit
        [--profile-out F.yaml]] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
from statistics import mean

import numpy as np

from specmd.study.costmodel import GraphLink, ModelTiming
from specmd.study.graph_sim import CallPath, GraphSchedule, GraphTiming
from specmd.study.trace import load_trace

OLMOE = ModelTiming.load("olmoe-1b-7b-0924")  # the replayed model's shapes: its expert's bytes
COUNTS = ("hits", "misses_cold", "misses_capacity", "misses_collision", "prefetch_hits", "prefetches", "evictions")


def row_settings(name: str) -> tuple[str, float, str, int, int | None, int | None]:
    """(eviction, budget %, prefetch policy, lookahead, gather programs, k) from a replayed row's name, e.g.
    'graph lru @ 5% (compiled, topk d1 p66 k2 from the trace, replayed trace)'."""
    match = re.match(r"graph (\S+) @ ([\d.]+)% \((.*)\)$", name)
    if match is None:
        raise ValueError(f"not a replayed graph row: {name!r}")
    eviction, budget, mode = match[1], float(match[2]), match[3]
    prefetch = re.search(r"(topk) d(\d)(?: p(\d+))?(?: k(\d+))?", mode)
    if prefetch is None:
        return eviction, budget, "none", 1, None, None
    programs, k = (int(x) if x else None for x in (prefetch[3], prefetch[4]))
    return eviction, budget, prefetch[1], int(prefetch[2]), programs, k


def counts_equal(live: dict, sim) -> bool:
    """Every per-layer count of the live row equals the simulator's (wasted prefetches in experts)."""
    expert = live["stats"]["expert_bytes"]
    return all([layer[c] for c in COUNTS] + [layer["wasted_prefetch_bytes"] // expert] ==
               [getattr(s, c) for c in COUNTS] + [s.wasted_prefetch_bytes]
               for layer, s in zip(live["stats"]["layers"], sim.layers, strict=True))


class _Recorder(GraphTiming):
    """Records each layer call's (tokens, demand copies, prefetched, chunked) instead of pricing it, for
    ``--fit``."""

    def __init__(self, model: ModelTiming) -> None:
        super().__init__(GraphLink("recording", 1.0, 1.0), model)
        object.__setattr__(self, "calls", [])

    def layer(self, tokens: int, demand: int, prefetched: int, path: CallPath = CallPath.STEP) -> float:
        self.calls.append((tokens, demand, prefetched, path is CallPath.CHUNKED))
        return 0.0


def fit(rows: list[tuple[dict, list[list[tuple[int, int, int]]]]], model: ModelTiming
        ) -> tuple[GraphLink, float, float]:
    """The link constants and a layer's compute on a grid (0.5 GB/s from 40, 1 GB/s, 5 us, 2% of ``model``'s)
    with the smallest worst TPOT error over ``rows``: (live row, its counted decode steps' layer calls).
    Returns (link, layer compute ms, worst error). ``GraphTiming.layer``, vectorised over the calls."""
    calls = [(live["tpot_ms"], len(steps), np.array([c[:3] for step in steps for c in step], dtype=float).T)
             for live, steps in rows]
    gb = model.expert_bytes / 1e9 * 1e3  # ms at 1 GB/s per expert
    best = None
    for gather, prefetch, compute in itertools.product([40 + 0.5 * i for i in range(29)], range(35, 56),
                                                       [model.decode_layer_ms * (0.5 + 0.02 * i) for i in range(31)]):
        # the overhead is added to every layer: the best one for the rest is the middle of the ratios' range
        ratios = []
        for tpot, num_steps, (tokens, demand, prefetched) in calls:
            step_ms = (demand * gb / gather + np.maximum(compute, prefetched * gb / prefetch)).sum() / num_steps
            ratios.append((step_ms, tpot, len(tokens) / num_steps))
        for overhead in [0.005 * i for i in range(21)]:
            worst = max(abs((step + overhead * layers) / tpot - 1) for step, tpot, layers in ratios)
            if best is None or worst < best[2]:
                best = (GraphLink("fit", gather, float(prefetch), round(overhead, 3)), compute, worst)
    return best


def fit_prefill(rows: list[tuple[dict, list[list[tuple[int, int, int, bool]]]]], link: GraphLink,
                expert_bytes: int) -> tuple[GraphLink, float]:
    """The prefill's constants on a grid (50 us a layer, 0.5 us a token, 0.25 ms a chunked call) with the
    smallest worst TTFT error over ``rows``: (live row, its prompts' prefill layer calls), the copies at
    ``link``'s gather rate. Returns (``link`` with them, worst error)."""
    gb = expert_bytes / 1e9 * 1e3
    sums = np.array([[sum(c[1] for p in prompts for c in p) * gb / link.gather_gbps / len(prompts),
                      sum(len(p) for p in prompts) / len(prompts),
                      sum(c[0] for p in prompts for c in p) / len(prompts),
                      sum(c[3] for p in prompts for c in p) / len(prompts)] for _, prompts in rows]).T
    ttft = np.array([live["ttft_ms"] for live, _ in rows])
    copies, calls, tokens, chunked = sums
    best = None
    for per_token, per_chunked in itertools.product([0.0005 * i for i in range(21)], [0.25 * i for i in range(25)]):
        rest = copies + tokens * per_token + chunked * per_chunked
        for per_layer in [0.05 * i for i in range(61)]:
            worst = float(np.max(np.abs((rest + calls * per_layer) / ttft - 1)))
            if best is None or worst < best[1]:
                best = (dataclasses.replace(link, prefill_layer_ms=round(per_layer, 3),
                                            prefill_token_ms=round(per_token, 4),
                                            chunked_layer_ms=round(per_chunked, 2)), worst)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--full-tpot-ms", type=float, default=None,
                        help="a compiled full-GPU TPOT of the same machine (ms): / MoE layers, a layer's compute "
                             "in place of the profile's (with --fit: the scale of the search; default 4.6)")
    parser.add_argument("--link", default="h200-graph-measured",
                        help="a GraphLink profile: a name in configs/hardware/ or a YAML path")
    parser.add_argument("--fit", action="store_true", help="fit the profile's constants to these rows first")
    parser.add_argument("--profile-out", default=None, help="with --fit: write the fitted profile (YAML) here")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trace = load_trace(args.trace)
    total = trace.num_layers * trace.num_experts
    live_rows = [live for path in args.results for live in json.load(open(path))["rows"]
                 if "replayed trace" in live.get("name", "") and "error" not in live]
    settings = {id(live): row_settings(live["name"]) for live in live_rows}
    link = GraphLink.load(args.link)
    if link.model is None:  # a gathers-only profile: the replayed model's compute comes from the arguments
        link = dataclasses.replace(link, model=OLMOE.name)
    model = OLMOE
    if args.full_tpot_ms is not None:
        link = dataclasses.replace(link, step_layer_ms=args.full_tpot_ms / trace.num_layers)
    elif link.step_layer_ms is None and not args.fit:
        parser.error(f"{args.link} has no step_layer_ms: give --full-tpot-ms (a compiled full-GPU step, ms)")
    if args.fit:
        scale = ModelTiming(OLMOE.name, OLMOE.expert_bytes, (args.full_tpot_ms or 4.6) / trace.num_layers)
        decode, prefill = [], []
        prefills = set(trace.prefill_passes)  # a one-token prompt's prefill is no decode step
        for live in live_rows:
            eviction, budget, prefetch, depth, _, k = settings[id(live)]
            recorder = _Recorder(OLMOE)
            schedule = GraphSchedule(trace.num_layers, trace.num_experts, trace.top_k, int(total * budget / 100),
                                     eviction, prefetch, depth, k, timing=recorder)
            schedule.replay(trace)  # the warm-up
            recorder.calls.clear()
            schedule.replay(trace)  # the counted replay: its decode steps
            steps = [recorder.calls[i:i + trace.num_layers] for i in range(0, len(recorder.calls), trace.num_layers)]
            decode.append((live, [s for p, s in enumerate(steps) if p not in prefills and s[0][0] == 1]))
            if any(call[3] for step in decode[-1][1] for call in step):
                parser.error(f"{live['name']}: its decode steps run chunked (fewer slots than top-k); --fit "
                             "prices decode steps as device steps: leave the row out")
            recorder.calls.clear()
            schedule.replay(trace.prefills())  # the prompts' prefills after it, as graph_h100 times them
            prefill.append((live, [recorder.calls[i:i + trace.num_layers]
                                   for i in range(0, len(recorder.calls), trace.num_layers)]))
        fitted, compute, worst = fit(decode, scale)
        link = dataclasses.replace(link, name="fit", gather_gbps=fitted.gather_gbps,
                                   prefetch_gbps=fitted.prefetch_gbps, overhead_ms=fitted.overhead_ms,
                                   step_layer_ms=round(compute, 4))
        link, worst_ttft = fit_prefill(prefill, link, OLMOE.expert_bytes)
        print(f"fitted over {len(live_rows)} rows (worst TPOT error {100 * worst:.1f}%, worst TTFT error "
              f"{100 * worst_ttft:.1f}%):")
        fitted_fields = {f: getattr(link, f) for f in ("gather_gbps", "prefetch_gbps", "overhead_ms", "model",
                                                       "step_layer_ms", "prefill_layer_ms", "prefill_token_ms",
                                                       "chunked_layer_ms")}
        print("\n".join(f"{key}: {value}" for key, value in fitted_fields.items()))
        if args.profile_out:
            with open(args.profile_out, "w") as f:
                f.write(f"# sim_vs_live.py --fit over {len(live_rows)} rows of {', '.join(args.results)}\n")
                f.write("".join(f"{key}: {value}\n" for key, value in fitted_fields.items()))
    timing = GraphTiming(link, model)
    rows = []
    for live in live_rows:
        eviction, budget, prefetch, depth, _, k = settings[id(live)]
        schedule = GraphSchedule(trace.num_layers, trace.num_experts, trace.top_k, int(total * budget / 100),
                                 eviction, prefetch, depth, k, timing=timing)
        schedule.replay(trace)  # the warm-up
        schedule.reset_counters()
        sim_tpot = mean(schedule.replay(trace)[1])
        sim = schedule.stats()
        sim_ttft = mean(schedule.replay(trace.prefills())[0])  # graph_h100 times the prefills after the replay
        rows.append({"name": live["name"], "counts_equal": counts_equal(live, sim), "live_tpot_ms": live["tpot_ms"],
                     "sim_tpot_ms": sim_tpot, "tpot_error": sim_tpot / live["tpot_ms"] - 1,
                     "live_ttft_ms": live["ttft_ms"], "sim_ttft_ms": sim_ttft,
                     "ttft_error": sim_ttft / live["ttft_ms"] - 1, "hit_rate": sim.hit_rate})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trace": args.trace, "link": vars(link), "rows": rows}, f, indent=1)
    print(f"link {link.name}: gather {link.gather_gbps} GB/s, prefetch {link.prefetch_gbps} GB/s, "
          f"{link.overhead_ms} ms per layer; a step's layer compute {timing.layer(1, 0, 0) - link.overhead_ms:.3f} "
          f"ms; a prefill's layer call {link.prefill_layer_ms} ms + {link.prefill_token_ms} ms a token (+ "
          f"{link.chunked_layer_ms} ms chunked)")
    print(f"{'row':<72}{'counts':>7}{'hit %':>7}{'TPOT live':>10}{'sim':>7}{'error':>8}{'TTFT live':>10}{'sim':>7}"
          f"{'error':>8}")
    for r in rows:
        print(f"{r['name']:<72}{'equal' if r['counts_equal'] else 'DIFFER':>7}{100 * r['hit_rate']:>7.1f}"
              f"{r['live_tpot_ms']:>10.2f}{r['sim_tpot_ms']:>7.2f}{100 * r['tpot_error']:>+7.1f}%"
              f"{r['live_ttft_ms']:>10.1f}{r['sim_ttft_ms']:>7.1f}{100 * r['ttft_error']:>+7.1f}%")
    # the bar: every row's estimate within 10% of live
    print(f"within 10%: TPOT {sum(abs(r['tpot_error']) <= 0.1 for r in rows)} of {len(rows)} rows, TTFT "
          f"{sum(abs(r['ttft_error']) <= 0.1 for r in rows)}; counts equal in {sum(r['counts_equal'] for r in rows)}")


if __name__ == "__main__":
    main()
