"""Speculative prefetch on the H100: OLMoE-1B-7B shapes, random bf16 weights, in one process.

For each budget, each {no prefetch, topk d=1, topk d=2, top-p} x {lru, least-stale} and each prompt
length: TTFT and TPOT (warm-up, median of repeats, CUDA-synchronised), then the counters of one full
generate: hit rate (resident + prefetch hits), late prefetches, compute-stream stall and copy-stream busy
time (CUDA events), prediction precision/recall; tokens checked against the full-GPU model measured first.

    python benchmarks/prefetch_h100.py --budgets 5% --prompts 16,512 --out prefetch.json
"""
from __future__ import annotations

import argparse
import json

import torch
from harness import measure, olmoe_on_gpu

import specmd

CONFIGS = [(eviction, prefetch, lookahead) for eviction in ("lru", "least-stale")
           for prefetch, lookahead in (("none", 1), ("topk", 1), ("topk", 2), ("top-p", 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="5%,25%")
    parser.add_argument("--prompts", default="16,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefetch_h100.py needs a CUDA GPU")

    model = olmoe_on_gpu()
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(10, 50000, (1, n), generator=gen).cuda() for n in map(int, args.prompts.split(","))}
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "full_gpu": {}, "runs": []}
    with torch.inference_mode():
        baseline = {}
        for n, ids in prompts.items():
            full = measure(model, ids, args.new_tokens, args.repeats)
            baseline[n] = full.pop("tokens")
            results["full_gpu"][n] = full
        for budget in args.budgets.split(","):
            for eviction, prefetch, lookahead in CONFIGS:
                specmd.offload(model, budget, eviction, "cuda", prefetch=prefetch, lookahead=lookahead, progress=True)
                for n, ids in prompts.items():
                    run = measure(model, ids, args.new_tokens, args.repeats, before_last=model.specmd.reset_stats)
                    stats = model.specmd.stats()  # the last full generate only
                    t = stats.total
                    results["runs"].append({
                        "budget": budget, "eviction": eviction, "prefetch": prefetch, "lookahead": lookahead,
                        "prompt": n, "ttft_ms": run["ttft_ms"], "tpot_ms": run["tpot_ms"],
                        "identical_tokens": bool(torch.equal(run["tokens"], baseline[n])),
                        "hit_rate": stats.hit_rate, "prefetch_hits": t.prefetch_hits,
                        "late_prefetches": t.late_prefetches, "stall_ms": t.stall_ms,
                        "copy_busy_ms": stats.copy_busy_ms, "precision": t.precision, "recall": t.recall,
                        "stats": stats.to_dict(),
                    })
                    print(json.dumps({k: v for k, v in results["runs"][-1].items() if k != "stats"}), flush=True)
                    if args.out:  # after every run, so a run cut short still leaves its results
                        with open(args.out, "w") as f:
                            json.dump(results, f, indent=1)
                model.specmd.close()
    print(f"\n{results['gpu']}  OLMoE-1B-7B shapes bf16, {args.new_tokens} new tokens, counters of one generate")
    print(f"{'budget':>6} {'prompt':>6} {'config':<24}{'TTFT ms':>9}{'TPOT ms':>9}{'hit %':>7}{'pf hits':>8}"
          f"{'late':>6}{'stall ms':>9}{'copy ms':>9}{'prec':>6}{'rec':>6}  same")
    for n, full in results["full_gpu"].items():
        print(f"{'-':>6} {n:>6} {'full GPU':<24}{full['ttft_ms']:>9.1f}{full['tpot_ms']:>9.1f}")
    for r in results["runs"]:
        name = f"{r['eviction']} {r['prefetch']}" + (f" d={r['lookahead']}" if r["prefetch"] != "none" else "")
        print(f"{r['budget']:>6} {r['prompt']:>6} {name:<24}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.1f}"
              f"{100 * r['hit_rate']:>7.1f}{r['prefetch_hits']:>8}{r['late_prefetches']:>6}{r['stall_ms']:>9.0f}"
              f"{r['copy_busy_ms']:>9.0f}{r['precision']:>6.2f}{r['recall']:>6.2f}  {r['identical_tokens']}")


if __name__ == "__main__":
    main()
