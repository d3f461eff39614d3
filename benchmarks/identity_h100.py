"""Where does bf16 specmd output leave the full-GPU model's? Layer by layer, bit for bit, on the GPU.

1. Captures every experts module's input and output in one full-GPU prefill (transformers' grouped_mm),
   twice (is the reference itself deterministic?).
2. Kernel probe: the same rows through torch's grouped_mm with the 64-expert weight (as transformers
   calls it) and with the experts scattered over S slots (S = 51, 64, 320, 1000 groups), and in two
   chunks: does a row's result depend on the group count or on the other rows?
3. Engine probe: specmd at several budgets computes each captured layer from its captured input; counts
   elements that differ from transformers' output, on a cold and on a warm cache.
4. End to end: 512-token prompt, 64 greedy tokens, full GPU vs specmd, after different histories.

    python benchmarks/identity_h100.py --out identity.json
"""
from __future__ import annotations

import argparse
import json

import torch

import specmd
from specmd.bench.models import build_model
from specmd.runtime.compute import grouped_mm_fn
from specmd.study.costmodel import ModelSpec


def capture(model, ids) -> list[tuple]:
    """(hidden, top_k_index, top_k_weights, output) of every experts module in one forward."""
    records, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.mlp.experts.register_forward_hook(
            lambda m, args, out: records.append(tuple(a.clone() for a in args) + (out.clone(),))))
    model(ids)
    for h in hooks:
        h.remove()
    return records


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


def kernel_probe(experts, hidden, index) -> dict:
    """Rows of one layer through grouped_mm under different group layouts; differing elements vs the
    64-group call transformers makes."""
    mm = grouped_mm_fn()  # the product transformers' grouped_mm runs
    w = experts.gate_up_proj.transpose(-2, -1)  # [E, H, 2I]
    num_experts = w.shape[0]
    ids = index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    x = hidden[perm // index.shape[1]]
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    reference = mm(x, w, offs=counts.cumsum(0, dtype=torch.int32))
    out = {}
    gen = torch.Generator().manual_seed(0)
    for num_groups in (51, 64, 320, 1000):
        if num_groups < num_experts:  # fewer slots than experts: only the first num_groups experts, as a chunk
            keep = sorted_ids < num_groups
            slot_of = torch.arange(num_groups)
            wk = w[:num_groups]
            ref_rows = reference[keep]
            xr = x[keep]
            c = counts[:num_groups]
        else:
            slot_of = torch.randperm(num_groups, generator=gen)[:num_experts]  # expert e -> slot
            # laid out like the slot pool's views: [S, 2I, H], transposed for the call
            wk = torch.zeros(num_groups, w.shape[2], w.shape[1], dtype=w.dtype, device=w.device)
            wk[slot_of.cuda()] = experts.gate_up_proj
            wk = wk.transpose(-2, -1)
            c = torch.zeros(num_groups, dtype=counts.dtype, device=counts.device)
            c[slot_of.cuda()] = counts
            # rows regrouped by slot order
            order = torch.argsort(slot_of.cuda()[sorted_ids], stable=True)
            xr, ref_rows = x[order], reference[order]
        got = mm(xr, wk, offs=c.cumsum(0, dtype=torch.int32))
        out[f"groups_{num_groups}"] = differing(got, ref_rows)
    half = num_experts // 2  # two chunks, each with its own call
    keep = sorted_ids < half
    a = mm(x[keep], w[:half], offs=counts[:half].cumsum(0, dtype=torch.int32))
    b = mm(x[~keep], w[half:], offs=counts[half:].cumsum(0, dtype=torch.int32))
    out["two_chunks"] = differing(torch.cat([a, b]), reference)
    again = mm(x, w, offs=counts.cumsum(0, dtype=torch.int32))
    out["repeat"] = differing(again, reference)
    return out


def engine_probe(model, records, budget: str) -> dict:
    """Differing elements per layer, specmd vs transformers, cold cache then warm (second pass)."""
    specmd.offload(model, budget, "lru", "cuda")
    passes = []
    try:
        for _ in range(2):
            diffs = []
            for layer, (hidden, index, weights, expected) in zip(model.model.layers, records):
                got = layer.mlp.experts(hidden, index, weights)
                diffs.append(differing(got, expected))
            passes.append(diffs)
    finally:
        model.specmd.close()
    return {"cold": passes[0], "warm": passes[1]}


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    if a.shape != b.shape:
        return 0
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[0, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = build_model(ModelSpec.load("olmoe-1b-7b-0924"), torch.device("cuda", 0), place="device")[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50000, (1, args.prompt), generator=gen).cuda()
    short = torch.randint(10, 50000, (1, 16), generator=gen).cuda()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt": args.prompt}
    with torch.inference_mode():
        records = capture(model, ids)
        again = capture(model, ids)
        result["reference_repeat_diff"] = [differing(a[-1], b[-1]) for a, b in zip(records, again)]
        experts = model.model.layers[0].mlp.experts
        result["kernel_probe_layer0"] = kernel_probe(experts, records[0][0], records[0][1])
        print("reference repeat diffs:", result["reference_repeat_diff"], flush=True)
        print("kernel probe (layer 0, differing elements vs 64 groups):", result["kernel_probe_layer0"], flush=True)
        full = [model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False) for _ in range(2)]
        full_short = model.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False)
        result["full_gpu_deterministic"] = bool(torch.equal(full[0], full[1]))
        for budget in ("5%", "25%", "100%"):
            result[f"engine_probe_{budget}"] = engine_probe(model, records, budget)
            print(budget, json.dumps(result[f"engine_probe_{budget}"]), flush=True)
        e2e = []
        for budget in ("5%", "25%"):
            specmd.offload(model, budget, "lru", "cuda")
            for history in ("fresh", "after_short", "after_long"):
                if history == "after_short":
                    model.generate(short, max_new_tokens=8, do_sample=False)
                elif history == "after_long":
                    model.generate(ids, max_new_tokens=8, do_sample=False)
                out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False)
                out_short = model.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           do_sample=False)
                e2e.append({"budget": budget, "history": history,
                            "first_diff_512": first_difference(out, full[0]),
                            "first_diff_16": first_difference(out_short, full_short)})
                print(json.dumps(e2e[-1]), flush=True)
            model.specmd.close()
        result["end_to_end"] = e2e
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for budget in ("5%", "25%", "100%"):
        p = result[f"engine_probe_{budget}"]
        print(f"engine {budget}: layers differing cold {sum(d > 0 for d in p['cold'])}/16, "
              f"warm {sum(d > 0 for d in p['warm'])}/16; elements {sum(p['cold'])}/{sum(p['warm'])}")
    print("full GPU deterministic:", result["full_gpu_deterministic"])
    for r in e2e:
        print(r)


if __name__ == "__main__":
    main()
