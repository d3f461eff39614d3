"""Why a graph-engine row's tokens differ from the full-GPU model's on a large shape: the engine, or compilation?

For each model shape (random bf16 weights, whole on the GPU), greedy tokens and per-step logits of:
- the full-GPU model, uncompiled (dynamic cache) and compiled (static cache, transformers' reduce-overhead
  decode step), the compiled one generated twice (is it deterministic run to run?);
- the graph engine at each budget, uncompiled (per-layer CUDA graphs) against the uncompiled model, and
  compiled against the compiled model.
Each comparison gives the first differing token, the largest logit difference at the prefill (step 0) and at
the first decode steps, and the reference's top-1 minus top-2 logit where the tokens part (a small margin
means a rounding flip, not a wrong expert); compiled graph rows also against the compiled model's second
generate where it differs from its first. ``--replay TRACE`` adds a compiled graph row generated after the
trace's prompts ran under its routing (``--bench-sequence``: as ``specmd bench`` runs them before its token
check, and on its prompt); ``--cache-len`` sets every compiled run's static cache length (the bench's: its
longest prompt + new tokens).

    python benchmarks/graph_numerics.py --models qwen1.5-moe-a2.7b olmoe-1b-7b-0924 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import specmd
from specmd.bench.compiled import decode_mode, fresh_compile
from specmd.bench.models import build_model
from specmd.bench.timing import replay_seconds
from specmd.study.costmodel import ModelSpec
from specmd.study.trace import load_trace

NEW_TOKENS = 64


def greedy(model, ids: torch.Tensor) -> dict:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    return {"tokens": out.sequences[0, ids.shape[1]:].cpu(), "scores": torch.stack(out.logits)[:, 0].float().cpu()}


def compare(run: dict, reference: dict) -> dict:
    """Where ``run`` leaves ``reference``: first differing token, logit differences, the reference's margin."""
    differs = (run["tokens"] != reference["tokens"]).nonzero()
    first = int(differs[0]) if len(differs) else None
    # Logits compare only while both runs have seen the same tokens: up to and including the first parting.
    upto = NEW_TOKENS if first is None else first + 1
    diff = (run["scores"][:upto] - reference["scores"][:upto]).abs().amax(dim=-1)
    out = {"same": first is None, "first_differing_token": first,
           "max_logit_diff_prefill": float(diff[0]),
           "max_logit_diff_decode_1_3": [float(d) for d in diff[1:4]],
           "max_logit_diff_until_parting": float(diff.max()), "max_logit_diff_per_step": [float(d) for d in diff],
           "first_step_logits_differ": int(diff.nonzero()[0]) if bool((diff > 0).any()) else None}
    if first is not None:
        top2 = reference["scores"][first].topk(2).values
        out["reference_margin_at_parting"] = float(top2[0] - top2[1])
        out["run_logit_diff_at_parting"] = float(diff[first])
    return out


def one_model(name: str, budgets: list[str], device: torch.device, cache_len: int | None = None,
              replay: tuple[str, int | None] | None = None, bench_ids: bool = False) -> list[dict]:
    model = build_model(ModelSpec.load(name), device, place="device")[0]
    model.set_experts_implementation("grouped_mm")
    high = model.config.vocab_size - 1 if bench_ids else min(50000, model.config.vocab_size)  # the bench's prompt
    ids = torch.randint(10, high, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []

    def add(label: str, run: dict, reference: dict, against: str) -> None:
        row = {"model": name, "run": label, "against": against, **compare(run, reference)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with torch.inference_mode():
        fresh_compile(model)
        decode_mode(model, compiled=False)
        eager = greedy(model, ids)
        fresh_compile(model)
        decode_mode(model, compiled=True, cache_len=cache_len)
        compiled = greedy(model, ids)
        add("full GPU compiled", compiled, eager, "full GPU uncompiled")
        second = greedy(model, ids)
        add("full GPU compiled, second generate", second, compiled, "full GPU compiled")
        varies = not torch.equal(second["scores"], compiled["scores"])

        def add_compiled(label: str, run: dict) -> None:
            """Against the compiled model's first generate, and its second too where the two differ (its
            compiled step is not reproducible run to run in bf16)."""
            add(label, run, compiled, "full GPU compiled")
            if varies:
                add(label, run, second, "full GPU compiled, 2nd")
        for budget in budgets:
            fresh_compile(model)
            specmd.offload(model, budget, "lru", str(device), engine="graph", progress=False)
            try:
                decode_mode(model, compiled=False)
                add(f"graph lru @ {budget}, per-layer graphs", greedy(model, ids), eager, "full GPU uncompiled")
                fresh_compile(model)
                decode_mode(model, compiled=True, cache_len=cache_len)
                greedy(model, ids)  # compiles the engine's step; the second generate is the one compared
                add_compiled(f"graph lru @ {budget}, compiled", greedy(model, ids))
                if replay is not None:
                    trace = load_trace(replay[0])
                    trace = trace.head(replay[1]) if replay[1] else trace
                    model.specmd.replay_routing(trace)
                    replay_seconds(model, trace.prompts, model.config.vocab_size, device)
                    if bench_ids:  # the rest of the bench's sequence (``ModelBench.replay_run``)
                        model.specmd.rewind_replay()
                        replay_seconds(model, trace.prompts, model.config.vocab_size, device)
                        model.specmd.replay_routing(trace.prefills())
                        replay_seconds(model, trace.prompts, model.config.vocab_size, device, prefill_only=True)
                    model.specmd.replay_routing(None)
                    add_compiled(f"graph lru @ {budget}, compiled, after replay", greedy(model, ids))
            finally:
                model.specmd.close()
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen1.5-moe-a2.7b"])
    parser.add_argument("--budgets", nargs="+", default=["5%", "100%"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-len", type=int, default=None, help="static cache length of every compiled run")
    parser.add_argument("--replay", default=None, help="a trace of the (first) model's topology: see above")
    parser.add_argument("--bench-sequence", action="store_true",
                        help="the bench's 16-token prompt, and its whole replay sequence before the compared generate")
    parser.add_argument("--replay-decode", type=int, default=None, help="replay each prompt's first N decode steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_numerics.py measures CUDA graphs and compiled steps: run it on a GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(args.models):
        replay = (args.replay, args.replay_decode) if args.replay and i == 0 else None
        rows += one_model(name, args.budgets, torch.device("cuda", 0), args.cache_len, replay, args.bench_sequence)
        (out / "graph-numerics.json").write_text(json.dumps({"new_tokens": NEW_TOKENS, "rows": rows}, indent=1))
    print(f"{'model':<20}{'run':<50}{'against':<22}{'first diff':>11}{'dlogit prefill':>15}{'dlogit step1':>13}"
          f"{'margin':>8}{'logits from':>12}")
    for r in rows:
        first = "-" if r["first_differing_token"] is None else r["first_differing_token"]
        margin = f"{r['reference_margin_at_parting']:.3f}" if "reference_margin_at_parting" in r else "-"
        step1 = r["max_logit_diff_decode_1_3"][0] if r["max_logit_diff_decode_1_3"] else float("nan")
        print(f"{r['model']:<20}{r['run']:<50}{r['against']:<22}{first:>11}{r['max_logit_diff_prefill']:>15.4f}"
              f"{step1:>13.4f}{margin:>8}{str(r['first_step_logits_differ']):>12}")


if __name__ == "__main__":
    main()
