"""How realistic is a routing trace? Statistics computed from the trace alone, side by side for learned and
real traces: per-layer expert-load entropy, token-to-token expert reuse and speculation recall at
lookahead 1..3, with the validation loss against the unigram baseline from each model's training report.

    python benchmarks/trace_realism.py --out benchmarks/results/2026-11-30-cpu-learned-traces \
        qwen3-30b-a3b=benchmarks/traces/trace-qwen3-30b-a3b-stdlib.json.gz:REPORT.json \
        granite-3.0-1b-a400m=../shared/traces/granite-3.0-1b-a400m.json

Each argument is NAME=TRACE[:TRAINING_REPORT]. Definitions (every token of every prompt, prefill and
decode, counts once):
- entropy: per MoE layer, the entropy (bits) of the distribution of routed ids over all tokens; the
  maximum is log2(experts), a perfectly even load.
- reuse: per layer, the fraction of token t's routed experts also routed at token t-1 of the same prompt
  (the prompt's last prefill token precedes its first decoded one); uniform random routing gives k/E.
- recall at d: on decode passes (one token, so the recorded candidates are that token's), the fraction of
  layer l+d's routed experts among the first k candidates recorded at layer l, for l+d inside the pass.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from specmd.study.trace import RoutingTrace, load_trace


def token_routes(trace: RoutingTrace) -> list[list[list[list[int]]]]:
    """Per prompt, per token in order, per layer: the token's routed ids (prefill ids are token-major)."""
    k, prompts, p = trace.top_k, [], 0
    for tokens, decode in trace.prompts:
        rows = [[trace.passes[p][layer][t * k:(t + 1) * k] for layer in range(trace.num_layers)]
                for t in range(tokens)]
        rows += [[ids for ids in trace.passes[p + 1 + i]] for i in range(decode)]
        prompts.append(rows)
        p += 1 + decode
    assert p == len(trace.passes), "prompts must account for every pass"
    return prompts


def load_entropy(trace: RoutingTrace) -> list[float]:
    """Per layer, the entropy (bits) of the routed ids' distribution over every token."""
    bits = []
    for layer in range(trace.num_layers):
        counts = Counter(e for p in trace.passes for e in p[layer])
        total = sum(counts.values())
        bits.append(-sum(c / total * math.log2(c / total) for c in counts.values()))
    return bits


def token_reuse(prompts: list[list[list[list[int]]]], num_layers: int) -> list[float]:
    """Per layer, the fraction of a token's routed experts the previous token of its prompt routed too."""
    reused, seen = [0] * num_layers, [0] * num_layers
    for rows in prompts:
        for before, now in zip(rows, rows[1:]):
            for layer in range(num_layers):
                reused[layer] += len(set(now[layer]) & set(before[layer]))
                seen[layer] += len(set(now[layer]))
    return [r / s for r, s in zip(reused, seen)]


def speculation_recall(trace: RoutingTrace) -> dict[str, float]:
    """Recall of the routed ids by the first k recorded candidates, per lookahead, on decode passes."""
    if trace.predicted is None:
        return {}
    hits, total = Counter(), Counter()
    decode = set(range(len(trace.passes))) - set(trace.prefill_passes)
    for p in sorted(decode):
        for layer in range(trace.num_layers):
            for d in range(1, trace.lookahead + 1):
                if layer + d >= trace.num_layers:
                    continue
                truth = set(trace.passes[p][layer + d])
                hits[d] += len(truth & set(trace.predicted[p][layer][d - 1][:trace.top_k]))
                total[d] += len(truth)
    return {f"d{d}": hits[d] / total[d] for d in sorted(total)}


def realism(name: str, trace_path: Path, report_path: Path | None) -> dict:
    """Every statistic of one trace (and its model's training report, if given)."""
    trace = load_trace(trace_path)
    prompts = token_routes(trace)
    entropy = load_entropy(trace)
    reuse = token_reuse(prompts, trace.num_layers)
    row = {"name": name, "trace": str(trace_path), "layers": trace.num_layers, "experts": trace.num_experts,
           "top_k": trace.top_k, "prompts": [list(p) for p in trace.prompts], "passes": len(trace.passes),
           "tokens": sum(len(rows) for rows in prompts), "entropy_bits": entropy,
           "max_entropy_bits": math.log2(trace.num_experts), "reuse": reuse,
           "reuse_mean": sum(reuse) / len(reuse), "reuse_random": trace.top_k / trace.num_experts,
           "recall": speculation_recall(trace)}
    if report_path:
        report = json.loads(report_path.read_text())
        row.update(val_loss=report["val_loss"], unigram_val_loss=report["unigram_val_loss"],
                   train_seconds=report["seconds"], train_tokens=report["train_tokens"],
                   train_device=report["device"], params=report["params"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| trace | layers x experts, top-k | prompts (prefill+decode) | val loss / unigram (nats) | "
             "load entropy per layer, bits (min-max / max) | token reuse, mean (min-max; random k/E) | "
             "recall d1 / d2 / d3 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['val_loss']:.2f} / {r['unigram_val_loss']:.2f}" if "val_loss" in r else "-"
        recall = " / ".join(f"{r['recall'][d]:.2f}" for d in ("d1", "d2", "d3") if d in r["recall"]) or "-"
        prompts = ", ".join(f"{t}+{n}" for t, n in r["prompts"])
        lines.append(f"| {r['name']} | {r['layers']} x {r['experts']}, {r['top_k']} | {prompts} | {loss} | "
                     f"{min(r['entropy_bits']):.2f}-{max(r['entropy_bits']):.2f} / {r['max_entropy_bits']:.2f} | "
                     f"{r['reuse_mean']:.2f} ({min(r['reuse']):.2f}-{max(r['reuse']):.2f}; "
                     f"{r['reuse_random']:.2f}) | {recall} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for realism.json and realism.md")
    parser.add_argument("traces", nargs="+", help="NAME=TRACE[:TRAINING_REPORT]")
    args = parser.parse_args()
    rows = []
    for item in args.traces:
        name, sep, paths = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected NAME=TRACE[:TRAINING_REPORT]")
        trace, _, report = paths.partition(":")
        rows.append(realism(name, Path(trace), Path(report) if report else None))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "realism.json").write_text(json.dumps(rows, indent=1))
    (out / "realism.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
