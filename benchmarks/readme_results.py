"""Regenerate the README's results tables from the committed bench result files (never typed by hand).

    python benchmarks/readme_results.py            # rewrites the blocks between <!-- bench:NAME --> markers

Each block ``<!-- bench:PATH -->`` ... ``<!-- /bench -->`` in README.md is replaced by the pivot table of
the JSON file at PATH (relative to the repository root).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from specmd.report import bench_pivot_markdown

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- bench:(?P<path>[^ ]+) -->\n)(.*?)(<!-- /bench -->)", re.S)


def render(text: str) -> str:
    def table(match: re.Match) -> str:
        results = json.loads((ROOT / match["path"]).read_text())
        return match[1] + bench_pivot_markdown(results) + match[4]

    return BLOCK.sub(table, text)


def main() -> None:
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))


if __name__ == "__main__":
    main()
