"""Policy study on learned routing: record a routing trace from a trained checkpoint (default: the shipped
one) on held-out text, then simulate every eviction policy (Belady included) x prefetch {none, recorded
top-k d=1, recorded top-k d=2, perfect d=1} at budgets 2/5/10/20/50%; write the trace, a Markdown table per
prefetch, which policy wins where, and hit-rate plots. An ids-only trace (no recorded predictions, such as
../shared/traces) gets none and perfect only.

    python benchmarks/trace_study.py --out benchmarks/results/2026-11-23-cpu
    python benchmarks/trace_study.py --model CKPT --name olmoe16x64-stdlib --trace-dir benchmarks/traces \
        --out benchmarks/results/DATE-olmoe16x64 --hardware h100-pcie-gen5-measured
    python benchmarks/trace_study.py --model CKPT --name qwen3-30b-a3b-stdlib --trace-dir benchmarks/traces \
        --record-only --prompts 4 --prompt-tokens 128,256,384,512 --new-tokens 128 --gzip --out DIR

``--prompt-tokens`` takes one length or a comma list that the prompts cycle through. A model file without
a measured ``timing`` section can still be timed with ``--layer-times-from MODEL``: its own expert size
(bf16, from its shapes) with MODEL's measured layer times, an estimate to be labelled as such.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
from pathlib import Path

import torch
from train_tiny_moe import DATA, split_corpus
from transformers import AutoTokenizer

import specmd
from specmd.bench.report import hit_rate_plot, markdown_table
from specmd.shipped import shipped_model_path
from specmd.study.sim import SIM_POLICIES, simulate
from specmd.study.trace import load_trace

BUDGETS = (2, 5, 10, 20, 50)
PREFETCHES = (("none", 1), ("topk", 1), ("topk", 2), ("perfect", 1))  # (prefetch, lookahead)


def record(args) -> Path:
    """Record the checkpoint's routing on held-out text; returns the trace file."""
    path = Path(args.model) if args.model else shipped_model_path()
    trace_path = Path(args.trace_dir or args.out) / f"trace-{args.name}.json{'.gz' if args.gzip else ''}"
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _, held_out = split_corpus(lzma.open(DATA, "rt", encoding="utf-8").read())
    ids = tokenizer(held_out).input_ids
    stride = len(ids) // args.prompts
    lengths = [int(n) for n in str(args.prompt_tokens).split(",")]
    model = specmd.from_pretrained(path, "100%", "lru", args.device, dtype=torch.float32, progress=False,
                                   attn_implementation=args.attn_implementation)
    recorder = model.specmd.record_routing(lookahead=3, model=path.name)
    with torch.inference_mode():
        for i in range(args.prompts):
            length = lengths[i % len(lengths)]
            prompt = torch.tensor([ids[i * stride:i * stride + length]]).to(model.device)
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    recorder.save(trace_path)
    print(f"{trace_path}: {trace_path.stat().st_size / 1e6:.1f} MB")
    return trace_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", default="96", help="prompt length, or a comma list cycled over prompts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped one)")
    parser.add_argument("--name", default="olmoe-pystdlib", help="names the trace and result files")
    parser.add_argument("--trace-dir", default=None, help="where the trace goes (default: --out)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gzip", action="store_true", help="write the trace as .json.gz")
    parser.add_argument("--attn-implementation", default=None, help="e.g. eager (GPT-OSS's sinks need it)")
    parser.add_argument("--record-only", action="store_true", help="record the trace, simulate nothing")
    parser.add_argument("--trace", default=None, help="simulate this recorded trace instead of recording one")
    parser.add_argument("--hardware", default=None, help="link profile: adds estimated TPOT to the table")
    parser.add_argument("--model-timing", default="olmoe-1b-7b-0924")
    parser.add_argument("--layer-times-from", default=None,
                        help="a model file whose measured layer times stand in for --model-timing's")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trace:
        trace_path = Path(args.trace)
    else:
        trace_path = record(args)
        if args.record_only:
            return
    trace = load_trace(trace_path)
    timing = None
    if args.hardware:
        from specmd.study.costmodel import LinkProfile, ModelTiming

        model_timing = (borrowed_timing(args.model_timing, args.layer_times_from) if args.layer_times_from
                        else ModelTiming.load(args.model_timing))
        timing = (LinkProfile.load(args.hardware), model_timing)
        print(f"timing: {model_timing}")
    total = trace.num_layers * trace.num_experts
    prefetches = [p for p in PREFETCHES if p[0] != "topk" or trace.predicted is not None]
    rows = []
    for prefetch, lookahead in prefetches:
        for budget in BUDGETS:
            for eviction in SIM_POLICIES:
                stats = simulate(trace, max(1, total * budget // 100), eviction, prefetch=prefetch,
                                 lookahead=lookahead, timing=timing)
                rows.append({"budget": f"{budget}%", "eviction": eviction, "prefetch": prefetch,
                             "lookahead": lookahead, **stats.to_dict()})
    with gzip.open(out / f"sim-{args.name}.json.gz", "wt") as f:  # compact: every row's per-layer counters
        json.dump(rows, f)
    tables = []
    for prefetch, lookahead in prefetches:
        subset = [r for r in rows if (r["prefetch"], r["lookahead"]) == (prefetch, lookahead)]
        name = prefetch if prefetch == "none" else f"{prefetch} d{lookahead}"
        tables.append(f"### prefetch: {name}\n\n" + markdown_table(subset))
        hit_rate_plot(subset, out / f"hit-rate-{name.replace(' ', '-')}.png",
                      title=f"{args.name}, learned routing, prefetch {name}")
    tables.append(winners(rows, prefetches))
    (out / f"sim-{args.name}.md").write_text("\n".join(tables))
    print("\n".join(tables))


def borrowed_timing(name: str, donor: str):
    """``name``'s expert size in bf16 (an expert's slot bytes, from its shapes on the meta device) with
    ``donor``'s measured per-layer times: for a model no GPU run has timed yet."""
    from transformers import AutoModelForCausalLM

    from specmd.runtime.adapters import find_moe_layers
    from specmd.study.costmodel import ModelSpec, ModelTiming

    config = ModelSpec.load(name).transformers_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layout = find_moe_layers(model)[0].layout
    times = ModelTiming.load(donor)
    return ModelTiming(f"{name} (layer times of {times.name})", layout.expert_bytes, times.decode_layer_ms,
                       times.prefill_ms_per_token)


def winners(rows: list[dict], prefetches) -> str:
    """Which online policy (Belady aside) has the best hit rate per prefetch and budget, which the best
    estimated TPOT (when the rows have one: collision misses stall, so the two can differ), and least-stale
    against lru there."""
    lines = ["### winners (Belady aside)\n", "| prefetch | budget | best hit rate | hit % | belady % | "
             "best estimated TPOT | ms | least-stale - lru (points) |", "|---|---|---|---|---|---|---|---|"]
    for prefetch, lookahead in prefetches:
        name = prefetch if prefetch == "none" else f"{prefetch} d{lookahead}"
        for budget in BUDGETS:
            cell = {r["eviction"]: r for r in rows if (r["prefetch"], r["lookahead"], r["budget"]) ==
                    (prefetch, lookahead, f"{budget}%")}
            online = {k: v for k, v in cell.items() if k != "belady"}
            top = max(online.values(), key=lambda r: r["hit_rate"])["hit_rate"]
            best = sorted(k for k, v in online.items() if v["hit_rate"] == top)
            gap = 100 * (cell["least-stale"]["hit_rate"] - cell["lru"]["hit_rate"])
            fastest, ms = "-", "-"
            if all(r.get("estimated_tpot_ms") is not None for r in online.values()):
                low = min(r["estimated_tpot_ms"] for r in online.values())
                fastest = ", ".join(sorted(k for k, v in online.items() if v["estimated_tpot_ms"] == low))
                ms = f"{low:.1f}"
            lines.append(f"| {name} | {budget}% | {', '.join(best)} | {100 * top:.1f} | "
                         f"{100 * cell['belady']['hit_rate']:.1f} | {fastest} | {ms} | {gap:+.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
