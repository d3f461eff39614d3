"""Where prefetch's host time goes: TPOT of OLMoE shapes at a budget with prefetch off, on the watchdog
thread, inline on the model's thread, and two ablations (predictions made but never submitted; the
watchdog woken for every request but copying nothing), with the CPU time of the model's thread and of
the watchdog per generated token, and the host cost of the CUDA calls one copy makes.

    python benchmarks/prefetch_host.py [--budgets 5%,25%] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

import specmd
from specmd.benchrun import build_model, measure
from specmd.costmodel import ModelSpec

VARIANTS = {  # name -> (prefetch, ablation)
    "none": ("none", None),
    "thread": ("topk", None),
    "inline": ({"policy": "topk", "inline": True}, None),
    "predict-only": ({"policy": "topk", "inline": True}, "no-submit"),
    "thread-no-copy": ("topk", "no-copy"),
}


def thread_cpu_s(thread: threading.Thread | None) -> float:
    if thread is None or not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def call_costs(expert_bytes: int, device: torch.device, n: int = 2000) -> dict:
    """Host microseconds per CUDA call of one copy's sequence (median over ``n``)."""
    source = torch.empty(expert_bytes // 64, dtype=torch.uint8).pin_memory()  # small: host cost only
    target = torch.empty_like(source, device=device)
    stream = torch.cuda.Stream(device)
    ready = torch.cuda.Event()
    costs = {}

    def timeit(name, fn):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        costs[name] = statistics.median(times) * 1e6

    timeit("Event(enable_timing) + record", lambda: torch.cuda.Event(enable_timing=True).record(stream))
    timeit("event.record", lambda: ready.record(stream))
    timeit("stream.wait_event", lambda: stream.wait_event(ready))
    timeit("event.query", ready.query)

    def copy():
        with torch.cuda.stream(stream):
            target.copy_(source, non_blocking=True)
    timeit("with stream: copy_", copy)
    torch.cuda.synchronize(device)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe-1b-7b-0924")
    parser.add_argument("--budgets", default="5%,25%")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eviction", default="least-stale")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    model, _ = build_model(ModelSpec.load(args.model), device, place="device")
    ids = torch.randint(10, model.config.vocab_size - 1, (1, args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    with torch.inference_mode():
        model.set_experts_implementation("grouped_mm")
        full = measure(model, ids, args.new_tokens, 2)
        rows.append({"budget": "100%", "variant": "full-gpu", "ttft_ms": full.ttft_ms, "tpot_ms": full.tpot_ms})
        for budget in args.budgets.split(","):
            for name in args.variants.split(","):
                prefetch, ablation = VARIANTS[name]
                specmd.offload(model, budget, args.eviction, "cuda", prefetch=prefetch)
                handle = model.specmd
                engine = handle._engine
                if ablation == "no-submit":
                    engine._submit = lambda requests: None
                elif ablation == "no-copy":
                    engine.cache.prefetch = lambda key, target: False
                watchdog = engine.watchdog._thread if engine.watchdog is not None else None
                cpu = {}

                def before_last():
                    handle.reset_stats()
                    cpu["model"], cpu["watchdog"] = time.thread_time(), thread_cpu_s(watchdog)
                try:
                    timed = measure(model, ids, args.new_tokens, 2, before_last=before_last, warmup_tokens=8)
                    model_cpu = time.thread_time() - cpu["model"]
                    watchdog_cpu = thread_cpu_s(watchdog) - cpu["watchdog"]
                    stats = handle.stats()
                    t = stats.total
                    rows.append({"budget": budget, "variant": name, "ttft_ms": timed.ttft_ms,
                                 "tpot_ms": timed.tpot_ms, "hit_rate": stats.hit_rate,
                                 "prefetches": t.prefetches, "stall_ms": t.stall_ms,
                                 "copy_busy_ms": stats.copy_busy_ms,
                                 "model_cpu_ms_per_token": 1e3 * model_cpu / args.new_tokens,
                                 "watchdog_cpu_ms_per_token": 1e3 * watchdog_cpu / args.new_tokens,
                                 "identical_tokens": bool(torch.equal(timed.tokens, full.tokens))})
                finally:
                    handle.close()
                print(rows[-1], flush=True)
        layout = specmd.adapters.find_moe_layers(model)[0].layout
        costs = call_costs(layout.expert_bytes, device)
    with open(os.path.join(args.out, "prefetch_host.json"), "w") as f:
        json.dump({"rows": rows, "call_costs_us": costs, "torch": torch.__version__}, f, indent=1)
    print(f"\n{'budget':<7}{'variant':<16}{'TTFT':>7}{'TPOT':>7}{'hit%':>7}{'pref':>6}{'stall':>7}"
          f"{'cpu/tok':>8}{'wd/tok':>8} same")
    for r in rows:
        print(f"{r['budget']:<7}{r['variant']:<16}{r['ttft_ms']:>7.1f}{r['tpot_ms']:>7.1f}"
              f"{100 * r.get('hit_rate', 1):>7.1f}{r.get('prefetches', 0):>6}{r.get('stall_ms', 0):>7.0f}"
              f"{r.get('model_cpu_ms_per_token', 0):>8.2f}{r.get('watchdog_cpu_ms_per_token', 0):>8.2f}"
              f" {r.get('identical_tokens', '-')}")
    print("host us per CUDA call:", {k: round(v, 1) for k, v in costs.items()})


if __name__ == "__main__":
    main()
