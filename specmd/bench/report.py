"""Result writers: a Markdown table and a PNG plot of simulator (or benchmark) rows.

A row is a flat dict with at least ``budget``, ``eviction``, ``prefetch``, ``hit_rate`` and
``total.misses_collision``, as ``specmd sim --out`` writes them.
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import REPLAY


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


def budget_percent(row: dict) -> float:
    """A row's budget as a percentage of all experts: from its capacity where the row has one (``specmd sim``
    rows, whatever form the budget was given in), else from a '5%' budget."""
    if "capacity" in row and "total_experts" in row:
        return 100 * row["capacity"] / row["total_experts"]
    return float(str(row["budget"]).rstrip("%"))


def hit_rate_plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Hit rate against budget, one line per configuration; ``belady`` drawn as the dashed top line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(_label(r) for r in rows):
        points = sorted((budget_percent(r), 100 * r["hit_rate"]) for r in rows if _label(r) == label)
        style = dict(linestyle="--", color="black") if label.startswith("belady") else {}
        ax.plot(*zip(*points), marker="o", label=label, **style)
    ax.set_xlabel("expert budget (% of all experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- benchmark results (specmd bench) ---------------------------------------------------------------------

def bench_label(row: dict) -> str:
    """A bench row's configuration: its name, with the budget unless the budget is implied (on-demand)."""
    return row["name"] + (f" @ {row['budget']}" if row.get("budget") and row["name"] != "on-demand" else "")


def same_tokens_text(row: dict) -> str:
    """yes / NO / - (not compared) for a bench row's token check."""
    return {True: "yes", False: "NO", None: "-"}[row.get("identical_tokens")]


def bench_markdown(results: dict) -> str:
    """One table per model: every result row with its timing, hit and copy figures and token check."""
    lines = []
    machine = results.get("machine", {})
    lines.append(f"Machine: {machine.get('gpu', 'no GPU')}, driver {machine.get('driver', '?')}, PCIe gen "
                 f"{machine.get('pcie_generation', '?')} x{machine.get('pcie_width', '?')}, "
                 f"{machine.get('host_cores', '?')} host cores; torch {machine.get('torch')}, transformers "
                 f"{machine.get('transformers')}, accelerate {machine.get('accelerate')}; specmd "
                 f"{str(machine.get('specmd_commit', '?'))[:10]}.\n")
    for model in dict.fromkeys(r["model"] for r in results["rows"]):
        native = results.get("native_gbps", {}).get(model)
        lines.append(f"### {model}" + (f" (native copy rate {native:.1f} GB/s)" if native else "") + "\n")
        routing = results.get("routing", {}).get(model)
        if routing and routing != "random":
            lines.append(f"specmd rows replay the learned routing of {routing.split(' ', 1)[1]} (its prompts; TTFT: "
                         "the prefills' mean, TPOT: the decode steps' mean); tokens are checked under the model's "
                         "own routers (random weights), against the full-GPU reference.\n")
        else:
            lines.append("Routing: the model's own routers, random weights: degenerate (see the README).\n")
        lines.append("| configuration | routing | link (GB/s measured) | prompt x batch | new | TTFT ms | TPOT ms "
                     "| tok/s | hit % | stall ms | GB copied | copy GB/s | peak VRAM GiB | same tokens |")
        lines.append("|---" * 14 + "|")
        for r in (r for r in results["rows"] if r["model"] == model):
            link = f"{r['link']} ({r['link_gbps_measured']:.1f})" if r.get("link_gbps_measured") else r.get("link", "-")
            hit = f"{100 * r['hit_rate']:.1f}" if "hit_rate" in r else "-"
            stall = f"{r['stall_ms']:.0f}" if "stall_ms" in r else "-"
            copied = f"{r['bytes_copied'] / 1e9:.1f}" if "bytes_copied" in r else "-"
            rate = f"{r['copy_gbps_achieved']:.1f}" if r.get("copy_gbps_achieved") else "-"
            same = same_tokens_text(r)
            lines.append(f"| {bench_label(r)} | {r.get('routing', 'random')} | {link} | {r['prompt']} x {r['batch']} "
                         f"| {r['new_tokens']} "
                         f"| {r['ttft_ms']:.1f} | {r['tpot_ms']:.1f} | {r['tokens_per_s']:.1f} | {hit} | {stall} "
                         f"| {copied} | {rate} | {r['peak_vram_bytes'] / 2**30:.2f} | {same} |")
        lines.append("")
    for why in results.get("skipped", []):
        lines.append(f"Skipped: {why}")
    for what in results.get("notes", []):
        lines.append(f"Note: {what}")
    return "\n".join(lines) + "\n"


def bench_plots(results: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """PNGs per model: TPOT and TTFT against budget per preset (one panel per link x prompt, batch 1),
    baselines as horizontal reference lines; hit rate against budget. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in results["rows"] if r["batch"] == min(x["batch"] for x in results["rows"])]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        specmd_rows = [r for r in mine if r["kind"] == "specmd"]
        if not specmd_rows:
            continue
        links = list(dict.fromkeys(r["link"] for r in specmd_rows))
        prompts = list(dict.fromkeys(r["prompt"] for r in specmd_rows))
        presets = list(dict.fromkeys(r["name"] for r in specmd_rows))
        for metric, label in (("tpot_ms", "TPOT (ms)"), ("ttft_ms", "TTFT (ms)"), ("hit_rate", "hit rate (%)")):
            fig, axes = plt.subplots(len(links), len(prompts), figsize=(5 * len(prompts), 3.6 * len(links)),
                                     squeeze=False)
            for i, link in enumerate(links):
                for j, prompt in enumerate(prompts):
                    ax = axes[i][j]
                    scale = 100 if metric == "hit_rate" else 1
                    for preset in presets:
                        points = sorted((budget_percent(r), scale * r[metric]) for r in specmd_rows
                                        if r["name"] == preset and r["link"] == link and r["prompt"] == prompt)
                        ax.plot(*zip(*points), marker="o", label=preset)
                    if metric != "hit_rate":
                        for r in mine:
                            if r["prompt"] != prompt or r["kind"] != "baseline":
                                continue
                            if r["name"].startswith("full-gpu") or (r["name"] == "on-demand" and r["link"] == link):
                                ax.axhline(r[metric], linestyle="--", linewidth=1, color="gray")
                                ax.annotate(r["name"], (0, r[metric]), xycoords=("axes fraction", "data"),
                                            fontsize=7, color="gray", va="bottom")
                        auto = sorted((budget_percent(r), r[metric]) for r in mine
                                      if r["name"] == "device-map-auto" and r["prompt"] == prompt)
                        if auto:
                            ax.plot(*zip(*auto), linestyle=":", marker="x", color="black", label="device_map=auto")
                            ax.set_yscale("log")
                    ax.set_title(f"{link}, prompt {prompt}", fontsize=9)
                    ax.set_xlabel("expert budget (% of expert bytes)")
                    ax.set_ylabel(label)
                    ax.grid(alpha=0.3)
                    ax.legend(fontsize=7)
            fig.suptitle(f"{model}: {label}", fontsize=10)
            fig.tight_layout()
            path = Path(out_dir) / f"{stem}-{model}-{metric.replace('_ms', '')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def bench_pivot_markdown(results: dict) -> str:
    """The README's results table: one line per configuration and budget, "TTFT / TPOT ms" per link x
    prompt (batch 1), the hit rate and stall of the line's shortest prompt on the first link, and whether every
    workload of the line reproduced the reference tokens."""
    rows = [r for r in results["rows"] if r["batch"] == 1]
    columns = list(dict.fromkeys((r.get("link", "-"), r["prompt"]) for r in rows if r["kind"] == "specmd"))
    where = f" ({columns[0][0]}, shortest prompt)" if columns else ""
    # a replayed row's prompt is the mean of the trace's prompts: say so, the baselines' prompt is one of that length
    replayed = {(r.get("link", "-"), r["prompt"]) for r in rows
                if r["kind"] == "specmd" and str(r.get("routing", "")).startswith(REPLAY)}
    head = "| configuration | " + " | ".join(
        f"{link} p{prompt}" + (" (replayed: mean prompt)" if (link, prompt) in replayed else "")
        for link, prompt in columns) + \
        f" | hit %{where} | stall ms / gen{where} | same tokens |"
    lines = [head, "|---" * (len(columns) + 4) + "|"]
    lines.append("| *TTFT / TPOT ms* |" + " |" * (len(columns) + 3))
    groups: dict[str, list[dict]] = {}
    several_models = len({r["model"] for r in rows}) > 1
    for r in rows:
        groups.setdefault((f"{r['model']}: " if several_models else "") + bench_label(r), []).append(r)
    for label, mine in groups.items():
        cells = []
        for link, prompt in columns:
            # baselines without a link (full GPU, device_map=auto) fill every link's column of their prompt
            match = [r for r in mine if r["prompt"] == prompt and r.get("link", link) == link]
            cells.append(f"{match[0]['ttft_ms']:.0f} / {match[0]['tpot_ms']:.1f}" if match else "")
        counted = [r for r in mine if "hit_rate" in r and r.get("link", columns[0][0]) == columns[0][0]]
        first = min(counted, key=lambda r: r["prompt"]) if counted else None
        hit = f"{100 * first['hit_rate']:.1f}" if first else "-"
        stall = f"{first['stall_ms']:.0f}" if first else "-"
        checks = [r["identical_tokens"] for r in mine if r["identical_tokens"] is not None]
        same = "-" if not checks else "yes" if all(checks) else f"no ({checks.count(False)} of {len(checks)})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {hit} | {stall} | {same} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path, stem: str, plots: bool = True) -> list[Path]:
    """``<stem>.json`` (everything), ``<stem>.md`` (the table) and, with ``plots``, the PNGs."""
    import json

    def plain(value):  # tuples of the config -> lists; anything else JSON cannot hold -> str
        return list(value) if isinstance(value, tuple) else str(value)

    files = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    files[0].write_text(json.dumps(results, indent=1, default=plain))
    files[1].write_text(bench_markdown(results))
    if plots:
        files += bench_plots(results, out_dir, stem)
    return files


def summary_table(results: dict) -> str:
    """A short fixed-width table of every row, printed last."""
    lines = [f"{'configuration':<28}{'routing':<40}{'link':<15}{'prompt':>7}{'TTFT ms':>9}{'TPOT ms':>9}"
             f"{'hit %':>7}{'stall ms':>9}  same"]
    for r in results["rows"]:
        name, same = bench_label(r), same_tokens_text(r)
        hit = f"{100 * r['hit_rate']:.1f}" if "hit_rate" in r else "-"
        stall = f"{r['stall_ms']:.0f}" if "stall_ms" in r else "-"
        lines.append(f"{name:<28}{r.get('routing', 'random'):<40}{r.get('link', '-'):<15}{r['prompt']:>7}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.1f}"
                     f"{hit:>7}{stall:>9}  {same}")
    return "\n".join(lines)


def default_out_dir(device) -> Path:
    """benchmarks/results/<date>-<gpu>/ under the repository (the current directory when installed)."""
    import torch

    name = torch.cuda.get_device_name(device).lower()
    gpu = next((w for w in name.replace("nvidia", "").split() if any(c.isdigit() for c in w)), "gpu")
    checkout = Path(__file__).resolve().parents[2]
    root = checkout if (checkout / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{gpu}"
