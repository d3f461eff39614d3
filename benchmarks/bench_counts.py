"""A replayed bench result (``specmd bench`` with ``routing: replay``) against the simulator's counts: for each
specmd row, ``study.sim.simulate`` replays the row's trace at its slots, eviction and prefetch, warm (the row
counted the replay after a whole warm-up one), and every per-layer count is compared. The threaded engine's
schedule without prefetch is deterministic, so those rows must be equal, and so must every graph-engine
row (``graph_sim.simulate_graph``); with prefetch the watchdog's copies
land when the link delivers them, so the live counts are printed beside the simulator's inline ones.

With ``--hardware`` (a threaded link profile, e.g. ``h200-threaded-measured``) the threaded rows on the
machine's own link are also priced by the simulator's timeline and printed against their live TPOT and TTFT.
A profile fitted to another model is refused unless ``--transfer``: then its host times price this model's rows
as they stand (with the row model's expert bytes), a held-out check of how far the fit carries.

    python benchmarks/bench_counts.py RESULT.json --trace T [--hardware PROFILE [--transfer]] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from specmd.bench.runner import ON_DEMAND
from specmd.config import OffloadConfig, preset_path
from specmd.study.costmodel import LinkProfile, ModelTiming
from specmd.study.graph_sim import simulate_graph
from specmd.study.sim import simulate
from specmd.study.trace import load_trace

COUNTS = ("accesses", "hits", "misses_cold", "misses_capacity", "misses_collision", "evictions", "prefetches",
          "prefetch_hits")


def settings(name: str) -> tuple[str, str, str, int, int | None]:
    """(engine, eviction, prefetch policy, lookahead, k) of a bench row's preset."""
    if name == "on-demand":
        return "threaded", ON_DEMAND["eviction"], ON_DEMAND["prefetch"], 1, None
    preset = OffloadConfig.from_yaml(preset_path(name))
    prefetch = preset.prefetch
    return preset.engine, preset.eviction, prefetch.policy, prefetch.lookahead, prefetch.k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a specmd bench result JSON whose specmd rows replayed --trace")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--hardware", help="a link profile (configs/hardware/) to price the native threaded rows")
    parser.add_argument("--transfer", action="store_true",
                        help="price with --hardware's host times even when they were fitted to another model")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.transfer and not args.hardware:
        parser.error("--transfer carries a profile's fit to another model: give the profile with --hardware")
    trace, rows, done = load_trace(args.trace), [], {}
    link = LinkProfile.load(args.hardware) if args.hardware else None
    print(f"{'row':<24}{'budget':>7} {'link':<14}{'slots':>6}  counts  "
          + " ".join(f"{c} live/sim" for c in ("hits", "collisions", "prefetch hits"))
          + ("  TPOT live/sim  TTFT live/sim" if link else ""))
    result = json.load(open(args.result))
    for r in result["rows"]:
        if r["kind"] != "specmd" and r["name"] != "on-demand":
            continue
        replayed = r.get("routing") or result.get("routing", {}).get(r["model"], "")
        if Path(args.trace).name not in replayed:  # a merged result holds other models' rows, on their traces
            print(f"{r['model']}: {r['name']} at {r.get('budget')} left out: it replayed {replayed or 'nothing'}")
            continue
        engine, eviction, prefetch, lookahead, k = settings(r["name"])
        priced = link is not None and r.get("link") == "native"  # an emulated link is another link
        if priced and link.model not in (None, r["model"]) and not args.transfer:
            parser.error(f"{args.hardware} carries the host times fitted to {link.model}, not {r['model']}: pass "
                         "--transfer to price this model's rows with them anyway, or a profile fitted to it")
        row_link = dataclasses.replace(link, model=r["model"]) if priced and args.transfer else link
        timing = (row_link, ModelTiming.load(r["model"])) if priced else None  # the row's model: its expert's bytes
        decode = r.get("replay_decode")  # the row replayed each prompt's first decode passes only
        replayed_trace = trace.head(decode) if decode else trace
        key = (r["model"], engine, r["num_slots"], eviction, prefetch, lookahead, k, priced, decode)
        if key not in done and engine == "graph":  # its own schedule (prefetch within the pass, on the device)
            done[key] = simulate_graph(replayed_trace, r["num_slots"], eviction, prefetch, lookahead, k, warm=True)
        elif key not in done:
            done[key] = simulate(replayed_trace, r["num_slots"], eviction, prefetch=prefetch, lookahead=lookahead,
                                 k=k, warm=True, timing=timing)
        stats = done[key]
        sim = [{c: getattr(layer, c) for c in COUNTS} for layer in stats.layers]
        live = [{c: layer[c] for c in COUNTS} for layer in r["stats"]["layers"]]
        total = {c: (sum(x[c] for x in live), sum(x[c] for x in sim)) for c in COUNTS}
        equal = live == sim
        row = {"name": r["name"], "budget": r.get("budget"), "link": r.get("link"), "slots": r["num_slots"],
               "prefetch": prefetch, "counts_equal": equal, "live_sim": total}
        times = ""
        if priced and engine == "threaded" and stats.estimated_ttft_ms is not None:
            row.update(live_tpot_ms=r["tpot_ms"], sim_tpot_ms=stats.estimated_tpot_ms, live_ttft_ms=r["ttft_ms"],
                       sim_ttft_ms=stats.estimated_ttft_ms)
            times = "".join(f"  {live:.1f}/{est:.1f} ({100 * (est / live - 1):+.1f}%)" for live, est in
                            [(r["tpot_ms"], stats.estimated_tpot_ms), (r["ttft_ms"], stats.estimated_ttft_ms)])
        rows.append(row)
        budget = "-" if r["name"] == "on-demand" else r.get("budget") or "-"  # on-demand's is its 8 slots' bytes
        print(f"{r['name']:<24}{budget:>7} {r.get('link', '-'):<14}{r['num_slots']:>6}  "
              f"{'equal ' if equal else 'DIFFER'}  " + "  ".join(f"{total[c][0]}/{total[c][1]}" for c in
                                                                  ("hits", "misses_collision", "prefetch_hits"))
              + times)
    priced = [r for r in rows if "sim_tpot_ms" in r]

    def within(kind: str) -> int:  # the bar: an estimate within 10% of live
        return sum(abs(r[f"sim_{kind}_ms"] / r[f"live_{kind}_ms"] - 1) <= 0.1 for r in priced)

    print(f"counts equal in {sum(r['counts_equal'] for r in rows)} of {len(rows)} rows" + (
        f"; within 10% of live: TPOT {within('tpot')} of {len(priced)} priced rows, TTFT {within('ttft')}"
        if priced else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
