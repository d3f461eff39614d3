"""Result writers: a Markdown table and a PNG plot of simulator (or benchmark) rows.

A row is a flat dict with at least ``budget``, ``eviction``, ``prefetch``, ``hit_rate`` and
``total.misses_collision``, as ``specmd sim --out`` writes them.
"""
from __future__ import annotations

from pathlib import Path


def _label(row: dict) -> str:
    prefetch = row.get("prefetch", "none")
    suffix = "" if prefetch in (None, "none") else f" + {prefetch}" + (
        f" d={row['lookahead']}" if row.get("lookahead", 1) != 1 else "")
    return f"{row['eviction']}{suffix}"


def markdown_table(rows: list[dict]) -> str:
    """Budgets down, configurations across: hit rate / collision misses (and estimated TPOT if present)."""
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    cell = {(r["budget"], _label(r)): r for r in rows}
    lines = ["| budget | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for budget in budgets:
        cells = []
        for label in labels:
            r = cell.get((budget, label))
            if r is None:
                cells.append("")
                continue
            text = f"{100 * r['hit_rate']:.1f}% / {r['total']['misses_collision']}"
            if r.get("estimated_tpot_ms") is not None:
                text += f" / {r['estimated_tpot_ms']:.1f} ms"
            cells.append(text)
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _budget_value(budget) -> float:
    text = str(budget)
    return float(text[:-1]) if text.endswith("%") else float(text)


def hit_rate_plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Hit rate against budget, one line per configuration; ``belady`` drawn as the dashed top line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(_label(r) for r in rows):
        points = sorted((_budget_value(r["budget"]), 100 * r["hit_rate"]) for r in rows if _label(r) == label)
        style = dict(linestyle="--", color="black") if label.startswith("belady") else {}
        ax.plot(*zip(*points), marker="o", label=label, **style)
    ax.set_xlabel("expert budget (% of all experts)" if str(rows[0]["budget"]).endswith("%") else "budget")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
