"""OLMoE-1B-7B-shaped model, random bf16 weights: full GPU vs specmd at a small expert budget.

Measures, in one process: TTFT and TPOT (CUDA-synchronised wall clock, warm-up first, median of
repeats) of the model fully on the GPU, then of the same model offloaded with each eviction policy;
checks the generated tokens are identical; reports hit/miss figures and peak device memory.

    python benchmarks/core_h100.py --budget 5% --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

import specmd

# OLMoE-1B-7B-0924 shapes (OlmoeConfig() defaults differ: intermediate 2048).
OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                   max_position_embeddings=4096, bos_token_id=1, eos_token_id=50279, pad_token_id=1)


def timed_generate(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate (synchronised before and after) and its output."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(model, ids, new_tokens: int, repeats: int) -> dict:
    """TTFT (generate of one token) and TPOT ((t_n - t_1) / (n - 1)), medians over ``repeats`` after a warm-up."""
    timed_generate(model, ids, new_tokens)  # warm-up
    ttft = statistics.median(timed_generate(model, ids, 1)[0] for _ in range(repeats))
    totals, out = [], None
    for _ in range(repeats):
        seconds, out = timed_generate(model, ids, new_tokens)
        totals.append(seconds)
    total = statistics.median(totals)
    return {"ttft_ms": ttft * 1e3, "tpot_ms": (total - ttft) / (new_tokens - 1) * 1e3, "tokens": out}


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

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(OlmoeConfig(**OLMOE_1B_7B), dtype=torch.bfloat16).eval()
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
