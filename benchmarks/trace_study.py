"""Policy study on learned routing: record a routing trace from the shipped checkpoint on held-out text,
then simulate every eviction policy (Belady included) x prefetch {none, recorded top-k d=1, perfect d=1}
at several budgets; write the trace, a Markdown table and hit-rate plots.

    python benchmarks/trace_study.py --out benchmarks/results/2026-11-23-cpu
"""
from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import torch
from train_tiny_moe import DATA, split_corpus
from transformers import AutoTokenizer

import specmd
from specmd.report import hit_rate_plot, markdown_table
from specmd.shipped import shipped_model_path
from specmd.sim import SIM_POLICIES, simulate
from specmd.trace import load_trace

BUDGETS = (2, 5, 10, 25, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = shipped_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _, held_out = split_corpus(lzma.open(DATA, "rt", encoding="utf-8").read())
    ids = tokenizer(held_out).input_ids
    stride = len(ids) // args.prompts
    model = specmd.from_pretrained(path, "100%", "lru", "cpu", dtype=torch.float32, progress=False)
    recorder = model.specmd.record_routing(lookahead=3, model=path.name)
    with torch.inference_mode():
        for i in range(args.prompts):
            prompt = torch.tensor([ids[i * stride:i * stride + args.prompt_tokens]])
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    recorder.save(out / "trace-olmoe-pystdlib.json")
    trace = load_trace(out / "trace-olmoe-pystdlib.json")
    total = trace.num_layers * trace.num_experts
    rows = []
    for prefetch in ("none", "topk", "perfect"):
        for budget in BUDGETS:
            for eviction in SIM_POLICIES:
                stats = simulate(trace, max(1, total * budget // 100), eviction, prefetch=prefetch, lookahead=1)
                rows.append({"budget": f"{budget}%", "eviction": eviction, "prefetch": prefetch, "lookahead": 1,
                             **stats.to_dict()})
    (out / "sim-olmoe-pystdlib.json").write_text(json.dumps(rows, indent=1))
    tables = []
    for prefetch in ("none", "topk", "perfect"):
        subset = [r for r in rows if r["prefetch"] == prefetch]
        tables.append(f"### prefetch: {prefetch}\n\n" + markdown_table(subset))
        hit_rate_plot(subset, out / f"hit-rate-{prefetch}.png",
                      title=f"shipped olmoe-pystdlib, learned routing, prefetch {prefetch}")
    (out / "sim-olmoe-pystdlib.md").write_text("\n".join(tables))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
