"""Regenerate the README's results tables from the committed bench result files (never typed by hand).

    python benchmarks/readme_results.py            # rewrites the blocks between <!-- bench:NAME --> markers

Each block ``<!-- bench:PATH -->`` ... ``<!-- /bench -->`` in README.md is replaced by the table of the JSON
file at PATH (relative to the repository root): the pivot table of a ``specmd bench`` result, or the
variant table of a ``benchmarks/prefetch_host.py`` result (a probe removed since; at commit c462432).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from specmd.bench.report import bench_pivot_markdown, same_tokens_text

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- bench:(?P<path>[^ ]+) -->\n)(.*?)(<!-- /bench -->)", re.S)


def prefetch_host_markdown(results: dict) -> str:
    """One row per budget x variant of a ``prefetch_host.py`` result file."""
    lines = ["| budget | variant | TTFT / TPOT ms | hit % | prefetches | stall ms / gen | model thread CPU ms / token "
             "| watchdog CPU ms / token | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        same = same_tokens_text(r)
        lines.append(f"| {r['budget']} | {r['variant']} | {r['ttft_ms']:.0f} / {r['tpot_ms']:.1f} "
                     f"| {100 * r.get('hit_rate', 1):.1f} | {r.get('prefetches', 0)} | {r.get('stall_ms', 0):.0f} "
                     f"| {r.get('model_cpu_ms_per_token', 0):.1f} | {r.get('watchdog_cpu_ms_per_token', 0):.2f} | {same} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    def table(match: re.Match) -> str:
        results = json.loads((ROOT / match["path"]).read_text())
        if results["rows"] and "variant" in results["rows"][0]:
            return match[1] + prefetch_host_markdown(results) + match[4]
        return match[1] + bench_pivot_markdown(results) + match[4]

    return BLOCK.sub(table, text)


def main() -> None:
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))


if __name__ == "__main__":
    main()
