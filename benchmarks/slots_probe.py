"""Is a 51-slot LRU pool really slower than 8 FIFO slots at 0% hits? Alternating repeats on the GPU
(result: benchmarks/results/2026-11-23-h100/slots-probe.txt).

    python benchmarks/slots_probe.py
"""
import statistics

import torch

import specmd
from specmd.adapters import find_moe_layers
from specmd.benchrun import build_model, measure
from specmd.costmodel import ModelSpec

device = torch.device("cuda", 0)
model, _ = build_model(ModelSpec.load("olmoe-1b-7b-0924"), device, place="device")
ids = torch.randint(10, 50000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
expert = find_moe_layers(model)[0].layout.expert_bytes
res = {}
with torch.inference_mode():
    model.set_experts_implementation("grouped_mm")
    full = measure(model, ids, 64, 2)
    print("full", full.tpot_ms, flush=True)
    for rep in range(3):
        for name, budget, ev in [("lru-51", 51 * expert, "lru"), ("fifo-8", 8 * expert, "fifo"),
                                 ("fifo-51", 51 * expert, "fifo"), ("lru-8", 8 * expert, "lru"),
                                 ("lru-102", 102 * expert, "lru")]:
            specmd.offload(model, budget, ev, "cuda")
            h = model.specmd
            t = measure(model, ids, 64, 2, before_last=h.reset_stats, warmup_tokens=8)
            s = h.stats()
            h.close()
            res.setdefault(name, []).append((t.tpot_ms, s.total.stall_ms, s.copy_busy_ms))
            print(rep, name, round(t.tpot_ms, 1), round(s.total.stall_ms), round(s.copy_busy_ms), torch.equal(t.tokens, full.tokens), flush=True)
for name, v in res.items():
    print(f"{name:<8} TPOT {[round(x[0],1) for x in v]} median {statistics.median(x[0] for x in v):.1f}  stall {[round(x[1]) for x in v]}")
