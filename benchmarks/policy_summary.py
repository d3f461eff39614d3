"""One compact table of several policy studies (``trace_study.py``'s sim-*.json.gz): per trace and prefetch,
the best online policy at each budget by hit rate and by estimated TPOT (one figure when the same policies
win both), and least-stale against lru.

    python benchmarks/policy_summary.py benchmarks/results/2026-11-30-cpu-learned-traces/*/sim-*.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from trace_study import BUDGETS, PREFETCHES


def best(cell: dict[str, dict], key: str, low: bool) -> tuple[list[str], float]:
    """The online policies (Belady aside) tied at the best ``key`` and that value."""
    online = {k: v for k, v in cell.items() if k != "belady" and v.get(key) is not None}
    if not online:
        return [], float("nan")
    top = (min if low else max)(v[key] for v in online.values())
    return sorted(k for k, v in online.items() if v[key] == top), top


def names(policies: list[str]) -> str:
    """Up to two tied policies by name; more are counted (prefetches that fill the cache tie everyone)."""
    return "/".join(policies) if len(policies) <= 2 else f"{len(policies)} tied"


def summary(path: Path, prefetches) -> list[str]:
    with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as f:
        rows = json.load(f)
    name = path.name.removeprefix("sim-").removesuffix(".gz").removesuffix(".json")
    lines = []
    for prefetch, lookahead in prefetches:
        label = prefetch if prefetch == "none" else f"{prefetch} d{lookahead}"
        cells, gaps = [], []
        for budget in BUDGETS:
            cell = {r["eviction"]: r for r in rows if (r["prefetch"], r["lookahead"], r["budget"]) ==
                    (prefetch, lookahead, f"{budget}%")}
            if not cell:
                break
            by_hit, hit = best(cell, "hit_rate", low=False)
            by_ms, ms = best(cell, "estimated_tpot_ms", low=True)
            text = f"{names(by_hit)} {100 * hit:.1f}%"
            text += f" / {ms:.1f} ms" if by_ms == by_hit else f"; {names(by_ms)} {ms:.1f} ms" if by_ms else ""
            cells.append(text)
            gaps.append(f"{100 * (cell['least-stale']['hit_rate'] - cell['lru']['hit_rate']):+.1f}")
        if cells:
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {', '.join(gaps)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path,
                        help="sim-*.json.gz files of trace_study.py (or plain sim-*.json)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--prefetch", default=None, help="only these, e.g. none,topk-d1 (default: every one)")
    args = parser.parse_args()
    head = ["| trace | prefetch | " + " | ".join(f"{b}%" for b in BUDGETS) + " | least-stale - lru (points) |",
            "|---|---|" + "---|" * len(BUDGETS) + "---|"]
    wanted = [p for p in PREFETCHES if args.prefetch is None or
              (p[0] if p[0] == "none" else f"{p[0]}-d{p[1]}") in args.prefetch.split(",")]
    table = "\n".join(head + [line for path in args.studies for line in summary(path, wanted)]) + "\n"
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
