"""Fits the threaded engine's prefetch terms of the cost model (``LinkProfile.host_predict_ms``,
``host_prefetch_ms``, ``prefetch_after_layer``) to the H200's learned-routing bench rows with prefetch.

The link, host and tail times stay those of ``h200-threaded-measured`` as session 6 fitted them on the rows
without prefetch. Grid: host time per looked-ahead router x host time per prefetch copy, with prefetch
copies starting when the layer's compute ends, and with them starting at once; the grids' bounds were
widened where the first run's optimum sat on one. Fitted on session 6's 8 native prefetch rows (lru and
least-stale, top-k d1 and d2, 5% and 25%: minimax TPOT error, ties by the mean error); the best of each form
then prices every row, session 5's 3 least-stale top-k rows (5/10/20%) held out. Two processes. Run from the
repository root:
    PYTHONPATH=. python benchmarks/results/2026-11-30-h200/session7/threaded-prefetch-fit.py
"""
import dataclasses
import json
import multiprocessing
import sys

from specmd.study.costmodel import LinkProfile, ModelTiming
from specmd.study.sim import simulate
from specmd.study.trace import load_trace

sys.path.insert(0, "benchmarks")
from bench_counts import settings  # noqa: E402

R = "benchmarks/results/2026-11-30-h200/"
trace = load_trace("benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz")
model = ModelTiming.load("olmoe-1b-7b-0924")
base = dataclasses.replace(LinkProfile.load("h200-threaded-measured"), host_predict_ms=0.0, host_prefetch_ms=0.0,
                           prefetch_after_layer=False)
rows = []
for session, path in [("session6", R + "session6/bench-prefetch/prefetch.json"),
                      ("session5", R + "session5/bench-default/default.json")]:
    for r in json.load(open(path))["rows"]:
        if "num_slots" not in r or r.get("link") != "native" or r["name"] == "on-demand":
            continue
        _, eviction, prefetch, lookahead, k = settings(r["name"])
        if prefetch != "none":
            rows.append((session, r, eviction, prefetch, lookahead, k))


def price_row(args):
    link, index = args
    session, r, eviction, prefetch, lookahead, k = rows[index]
    s = simulate(trace, r["num_slots"], eviction, prefetch=prefetch, lookahead=lookahead, k=k, warm=True,
                 timing=(link, model))
    return (s.estimated_tpot_ms / r["tpot_ms"] - 1, s.estimated_ttft_ms / r["ttft_ms"] - 1, s.estimated_tpot_ms,
            s.estimated_ttft_ms)


def profile(predict, per_copy, after):
    return dataclasses.replace(base, host_predict_ms=predict, host_prefetch_ms=per_copy, prefetch_after_layer=after)


GRIDS = {True: [(p, c) for p in (0.05, 0.10, 0.15, 0.20, 0.25) for c in (0.06, 0.08, 0.10)],
         False: [(p, c) for p in (0.10, 0.15, 0.20, 0.25) for c in (0.08, 0.10, 0.12, 0.14, 0.16)]}
fitted = [i for i, row in enumerate(rows) if row[0] == "session6"]
if __name__ == "__main__":
    with multiprocessing.Pool(2) as pool:
        best = {}
        for after, grid in GRIDS.items():
            for predict, per_copy in grid:
                errors = [abs(o[0]) for o in pool.map(price_row, [(profile(predict, per_copy, after), i)
                                                                 for i in fitted])]
                score = (max(errors), sum(errors) / len(errors))
                print(f"after layer {after!s:<5} predict {predict:.2f} ms, per copy {per_copy:.2f} ms: fitted TPOT "
                      f"worst {100 * score[0]:.1f}%, mean {100 * score[1]:.1f}%", flush=True)
                best[after] = min(best.get(after, (score, predict, per_copy)), (score, predict, per_copy))
        for after, ((worst, mean), predict, per_copy) in best.items():
            out = pool.map(price_row, [(profile(predict, per_copy, after), i) for i in range(len(rows))])
            print(f"\nbest with prefetch_after_layer {after}: host_predict_ms {predict}, host_prefetch_ms {per_copy} "
                  f"(fitted TPOT worst {100 * worst:.1f}%, mean {100 * mean:.1f}%)")
            print(f"{'row':<26}{'budget':>7} {'session':<9}{'TPOT live':>10}{'sim':>7}{'err':>8}"
                  f"{'TTFT live':>11}{'sim':>7}{'err':>8}")
            for (e_tpot, e_ttft, tpot, ttft), (session, r, *_) in zip(out, rows):
                print(f"{r['name']:<26}{r['budget']:>7} {session:<9}{r['tpot_ms']:>10.1f}{tpot:>7.1f}"
                      f"{100 * e_tpot:>+7.1f}%{r['ttft_ms']:>11.1f}{ttft:>7.1f}{100 * e_ttft:>+7.1f}%")
