"""Learned routing on a full-size model: replay a recorded OLMoE-topology trace live on the GPU and set
it next to the simulator's estimate for the same trace and link profile.

The OLMoE-1B-7B-shaped model (random bf16 weights) is offloaded at the budget; its routers' choices come
from the trace (``replay_routing``), prompt lengths and decode steps from the trace's prompts. Each forward
pass is timed with CUDA events around the decoder (TTFT = mean prefill pass, TPOT = mean decode pass, as
the simulator defines them); kernels are warmed up first on a throwaway offload, the cache starts cold as
in the simulator.

    python benchmarks/replay_h100.py --trace benchmarks/traces/olmoe16x64-stdlib.json --budget 5% --out replay.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import specmd
from specmd.bench.models import build_model
from specmd.study.costmodel import LinkProfile, ModelSpec, ModelTiming
from specmd.study.sim import simulate
from specmd.study.trace import load_trace


def pass_timer(model):
    """CUDA events around every forward pass of the decoder: ([start, end] pairs, hook handles)."""
    events = []

    def before(module, args, kwargs):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        events.append([start, None])

    def after(module, args, kwargs, output):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        events[-1][1] = end

    return events, [model.model.register_forward_pre_hook(before, with_kwargs=True),
                    model.model.register_forward_hook(after, with_kwargs=True)]


def live(model, trace, budget: str, eviction: str) -> dict:
    specmd.offload(model, budget, eviction, "cuda")
    events, hooks = pass_timer(model)
    try:
        model.specmd.replay_routing(trace)
        gen = torch.Generator().manual_seed(0)
        for tokens, decode in trace.prompts:
            ids = torch.randint(10, 50000, (1, tokens), generator=gen).cuda()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode + 1,
                           min_new_tokens=decode + 1, do_sample=False)
        torch.cuda.synchronize()
        stats = model.specmd.stats()
    finally:
        model.specmd.close()
        for hook in hooks:
            hook.remove()
    times = [start.elapsed_time(end) for start, end in events]
    passes = [len(p[0]) // trace.top_k for p in trace.passes]
    assert len(times) == len(passes), (len(times), len(passes))
    prefill = [t for t, n in zip(times, passes) if n > 1]
    decode = [t for t, n in zip(times, passes) if n == 1]
    return {"ttft_ms": statistics.mean(prefill), "tpot_ms": statistics.mean(decode), "hit_rate": stats.hit_rate,
            "misses": stats.total.misses, "misses_collision": stats.total.misses_collision,
            "stall_ms": stats.total.stall_ms, "copy_busy_ms": stats.copy_busy_ms, "num_slots": stats.num_slots,
            "passes": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--policies", default="lru,least-stale")
    parser.add_argument("--hardware", default="h100-pcie-gen5-measured")
    parser.add_argument("--model-timing", default="olmoe-1b-7b-0924")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trace = load_trace(args.trace)
    model = build_model(ModelSpec.load("olmoe-1b-7b-0924"), torch.device("cuda", 0), place="device")[0]
    link, timing = LinkProfile.load(args.hardware), ModelTiming.load(args.model_timing)
    results = {"gpu": torch.cuda.get_device_name(), "trace": args.trace, "budget": args.budget,
               "hardware": args.hardware, "rows": []}
    with torch.inference_mode():
        specmd.offload(model, args.budget, "lru", "cuda")  # warm-up: kernels and the host store, not the cache
        ids = torch.randint(10, 50000, (1, trace.prompts[0][0])).cuda()
        model.generate(ids, max_new_tokens=8, do_sample=False)
        model.specmd.close()
        for eviction in args.policies.split(","):
            got = live(model, trace, args.budget, eviction)
            sim = simulate(trace, got["num_slots"], eviction, timing=(link, timing))
            row = {"eviction": eviction, "live": got,
                   "sim": {"ttft_ms": sim.estimated_ttft_ms, "tpot_ms": sim.estimated_tpot_ms,
                           "hit_rate": sim.hit_rate, "misses": sim.total.misses,
                           "misses_collision": sim.total.misses_collision, "stall_ms": sim.stall_ms,
                           "copy_busy_ms": sim.copy_busy_ms}}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['gpu']}: replay of {args.trace} at {args.budget} vs simulator ({args.hardware})")
    print(f"{'eviction':<12}{'live TTFT':>10}{'sim TTFT':>10}{'diff':>7}{'live TPOT':>10}{'sim TPOT':>10}{'diff':>7}"
          f"{'live hit':>9}{'sim hit':>8}{'live miss':>10}{'sim miss':>9}")
    for r in results["rows"]:
        lv, sm = r["live"], r["sim"]
        print(f"{r['eviction']:<12}{lv['ttft_ms']:>10.1f}{sm['ttft_ms']:>10.1f}"
              f"{100 * (sm['ttft_ms'] / lv['ttft_ms'] - 1):>6.0f}%{lv['tpot_ms']:>10.1f}{sm['tpot_ms']:>10.1f}"
              f"{100 * (sm['tpot_ms'] / lv['tpot_ms'] - 1):>6.0f}%{100 * lv['hit_rate']:>8.1f}%"
              f"{100 * sm['hit_rate']:>7.1f}%{lv['misses']:>10}{sm['misses']:>9}")


if __name__ == "__main__":
    main()
