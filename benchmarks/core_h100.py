"""OLMoE-1B-7B-shaped model, random bf16 weights: full GPU vs specmd at a small expert budget.

Measures, in one process: TTFT and TPOT (CUDA-synchronised wall clock, warm-up first, median of
repeats) of the model fully on the GPU, then of the same model offloaded with each eviction policy;
checks the generated tokens are identical; reports hit/miss figures and peak device memory.

    python benchmarks/core_h100.py --budget 5% --out results.json
"""
from __future__ import annotations

import argparse
import json

import torch
from harness import measure, olmoe_on_gpu, timed_generate

import specmd

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--policies", default="lru,least-stale")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("core_h100.py needs a CUDA GPU")

    model = olmoe_on_gpu()
    ids = torch.randint(10, 50000, (1, args.prompt), device="cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "budget": args.budget,
               "prompt": args.prompt, "new_tokens": args.new_tokens, "runs": []}
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats()
        full = measure(model, ids, args.new_tokens, args.repeats)
        full_peak = torch.cuda.max_memory_allocated()
        results["full_gpu"] = {"ttft_ms": full["ttft_ms"], "tpot_ms": full["tpot_ms"], "peak_bytes": full_peak}

        first = True
        for policy in args.policies.split(","):
            if first:
                specmd.offload(model, args.budget, policy, "cuda", progress=True)
                first = False
            else:
                model.specmd.close()
                specmd.offload(model, args.budget, policy, "cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()  # non-expert weights + slot pool
            pool_bytes = model.specmd._engine.cache.pool.numel() * 2
            torch.cuda.reset_peak_memory_stats()
            run = measure(model, ids, args.new_tokens, args.repeats)
            model.specmd.reset_stats()
            _, tokens = timed_generate(model, ids, args.new_tokens)
            stats = model.specmd.stats()
            same = torch.equal(tokens, full["tokens"]) and torch.equal(run["tokens"], full["tokens"])
            results["runs"].append({
                "policy": policy, "ttft_ms": run["ttft_ms"], "tpot_ms": run["tpot_ms"], "identical_tokens": same,
                "budget_bytes": stats.budget_bytes, "pool_bytes": pool_bytes, "num_slots": stats.num_slots,
                "resident_after_offload_bytes": base, "peak_bytes": torch.cuda.max_memory_allocated(),
                "stats_one_generate": stats.to_dict(),
            })
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    f = results["full_gpu"]
    print(f"\n{results['gpu']}  OLMoE-1B-7B shapes bf16, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"budget {args.budget}")
    print(f"{'config':<22}{'TTFT ms':>9}{'TPOT ms':>9}{'hit %':>7}{'misses':>8}{'coll':>6}{'peak GiB':>9}"
          f"{'pool GiB':>9}{'budget GiB':>11}  same")
    print(f"{'full GPU':<22}{f['ttft_ms']:>9.1f}{f['tpot_ms']:>9.1f}{'':>7}{'':>8}{'':>6}{f['peak_bytes']/2**30:>9.2f}")
    for r in results["runs"]:
        t = r["stats_one_generate"]
        print(f"{'specmd ' + r['policy']:<22}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.1f}{100*t['hit_rate']:>7.1f}"
              f"{t['total']['misses']:>8}{t['total']['misses_collision']:>6}{r['peak_bytes']/2**30:>9.2f}"
              f"{r['pool_bytes']/2**30:>9.2f}{r['budget_bytes']/2**30:>11.2f}  {r['identical_tokens']}")


if __name__ == "__main__":
    main()
