"""One bench result from the parts of a matrix run in separate processes (``specmd bench`` on configs that split
the budgets, e.g. because one device call cannot hold the whole matrix): the merged JSON, its Markdown table
and plots, as ``specmd bench`` writes them.

    python benchmarks/merge_bench.py PART.json [...] --out DIR --stem default
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from specmd.bench.report import write_results
from specmd.bench.results import merge_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", type=Path, help="result JSONs of `specmd bench`, in budget order")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged files")
    parser.add_argument("--stem", default="default", help="file name stem (default: default)")
    args = parser.parse_args()
    merged = merge_results([json.loads(p.read_text()) for p in args.parts])
    merged["merged_from"] = [str(p) for p in args.parts]
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write_results(merged, args.out, args.stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
