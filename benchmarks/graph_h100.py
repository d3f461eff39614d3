"""The graph engine against the threaded engine and the full-GPU model, on the GPU, in one process.

OLMoE-1B-7B shapes, random bf16 weights (random routing: degenerate, see the README), a 16-token prompt and
64 new tokens. Rows: full GPU (transformers' default kernels, uncompiled), the threaded engine (no prefetch)
and the graph engine (no prefetch; each layer's decode step replayed as a CUDA graph) at several budgets. Tokens are checked against
the full-GPU model. The link floor of a budget: bytes gathered per decoded token / the pinned copy rate
measured in this run. Host syncs per decoded token: CUDA synchronize calls and device->host copies counted
by torch's profiler over one generate, divided by its decode steps (generate itself syncs once a token).
Also: every family's tiny model in bf16 through the graph engine, tokens against transformers.

    python benchmarks/graph_h100.py --out DIR        # prints a table last; DIR/graph.json holds everything
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import specmd
from specmd.bench.models import build_model
from specmd.bench.timing import copy_gbps, measure
from specmd.runtime.adapters import find_moe_layers
from specmd.study.costmodel import ModelSpec
from specmd.tiny import TINY_CONFIGS, tiny_model

NEW_TOKENS = 64
CONFIGS = [("threaded", "lru", "100%"), ("threaded", "lru", "5%"), ("graph", "lru", "100%"), ("graph", "lru", "5%")]


def syncs_per_token(model, ids: torch.Tensor) -> float:
    """CUDA synchronize calls and device->host copies per decode step of one generate."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    count = sum(1 for n in names if "Synchronize" in n or "DtoH" in n or "Memcpy DtoH" in n)
    return count / 8


def families_bf16() -> dict:
    """Every family's tiny model in bf16 through the graph engine (decode steps on the device path)."""
    out = {}
    for family in sorted(TINY_CONFIGS):
        ref = tiny_model(family, dtype=torch.bfloat16).cuda()
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
        want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expert = find_moe_layers(ref)[0].layout.expert_bytes
        same = []
        for budget in (2 * ref.config.num_experts_per_tok * expert, "50%"):
            specmd.offload(ref, budget, "lru", "cuda", engine="graph")
            same.append(bool(torch.equal(ref.generate(ids, max_new_tokens=12, min_new_tokens=12,
                                                      do_sample=False), want)))
            ref.specmd.close()
        out[family] = same
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    model = build_model(ModelSpec.load("olmoe-1b-7b-0924"), device, place="device")[0]
    model.set_experts_implementation("grouped_mm")  # transformers' default kernels: generate decodes with batched_mm
    layers = find_moe_layers(model)
    expert_bytes = layers[0].layout.expert_bytes
    ids = torch.randint(10, 50000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    with torch.inference_mode():
        full = measure(model, ids, NEW_TOKENS, 3)
        rows.append({"name": "full-gpu", "ttft_ms": full.ttft_ms, "tpot_ms": full.tpot_ms, "same": True,
                     "syncs_per_token": syncs_per_token(model, ids)})
        rate = copy_gbps(expert_bytes, device)
        for engine, eviction, budget in CONFIGS:
            specmd.offload(model, budget, eviction, "cuda", engine=engine, progress=False)
            timed = measure(model, ids, NEW_TOKENS, 3, before_last=model.specmd.reset_stats, warmup_tokens=8)
            stats = model.specmd.stats()
            decode_bytes = stats.total.bytes_copied  # the last generate: prefill + 63 decode steps
            captured = getattr(model.specmd.engine, "captured_graphs", None)
            row = {"name": f"{engine} {eviction} @ {budget}", "captured_graphs": captured, "ttft_ms": timed.ttft_ms, "tpot_ms": timed.tpot_ms,
                   "same": bool(torch.equal(timed.tokens, full.tokens)), "hit_rate": stats.hit_rate,
                   "gb_per_token": decode_bytes / NEW_TOKENS / 1e9,
                   "link_floor_ms": decode_bytes / NEW_TOKENS / (rate * 1e9) * 1e3,
                   "syncs_per_token": syncs_per_token(model, ids), "stats": stats.to_dict()}
            rows.append(row)
            model.specmd.close()
            print(json.dumps({k: v for k, v in row.items() if k != "stats"}), flush=True)
    del model
    torch.cuda.empty_cache()
    result = {"copy_gbps": rate, "rows": rows, "families_bf16": families_bf16(),
              "machine": torch.cuda.get_device_name(device), "torch": torch.__version__}
    (out / "graph.json").write_text(json.dumps(result, indent=1))
    print(f"pinned copy of one expert: {rate:.1f} GB/s; bf16 families through the graph engine, tokens equal: "
          f"{result['families_bf16']}")
    print(f"{'configuration':<28}{'TTFT ms':>9}{'TPOT ms':>9}{'floor ms':>9}{'hit %':>7}{'syncs/tok':>10}"
          f"{'graphs':>7}  same")
    for r in rows:
        floor = f"{r['link_floor_ms']:.1f}" if "link_floor_ms" in r else "-"
        hit = f"{100 * r['hit_rate']:.1f}" if "hit_rate" in r else "-"
        graphs = "-" if r.get("captured_graphs") is None else str(r["captured_graphs"])
        print(f"{r['name']:<28}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.1f}{floor:>9}{hit:>7}{r['syncs_per_token']:>10.1f}"
              f"{graphs:>7}  {'yes' if r['same'] else 'NO'}")


if __name__ == "__main__":
    main()
