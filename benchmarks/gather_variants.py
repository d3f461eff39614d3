"""Which form of the miss gather reads pinned host memory fastest (issue 11: the 5% budget's link floor).

The step's gather ran at about 44.5-48.8 GB/s on the H200, the copy engine at 52-54: at 5% that gap alone
puts the step above 1.1x the floor. This sweeps the kernel's shape (32-bit words per program, warps per
program, which grid axis runs first, cache hints on the load and the store, the mask) on 8 OLMoE-1B-7B
experts (12.6 MB each, 101 MB) from a 64-expert pinned layer into device slots, against the copy engine
moving the same experts (8 async copies) in the same process. Median of 20 repeats after 3 warm-ups, CUDA
events; every variant's copy checked against the host rows.

    python benchmarks/gather_variants.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl
from gather_programs import EXPERT_WORDS, timed  # benchmarks/, the script's own folder

from specmd.runtime.gather import host_words

EXPERTS = [3, 17, 29, 31, 40, 44, 52, 60]


@triton.jit
def _variant(store, pool, experts, slots, count, words_per_expert, WORDS: tl.constexpr, EXPERT_AXIS: tl.constexpr,
             LOAD: tl.constexpr, STORE: tl.constexpr, MASKED: tl.constexpr):
    j = tl.program_id(EXPERT_AXIS)
    piece = tl.program_id(1 - EXPERT_AXIS)
    if j < tl.load(count):
        expert = tl.load(experts + j).to(tl.int64)
        slot = tl.load(slots + j).to(tl.int64)
        offsets = piece * WORDS + tl.arange(0, WORDS)
        inside = offsets < words_per_expert
        src = store + expert * words_per_expert + offsets
        dst = pool + slot * words_per_expert + offsets
        if MASKED:
            if LOAD == 1:
                words = tl.load(src, mask=inside, cache_modifier=".cg")
            elif LOAD == 2:
                words = tl.load(src, mask=inside, cache_modifier=".cv")
            else:
                words = tl.load(src, mask=inside)
            if STORE == 1:
                tl.store(dst, words, mask=inside, cache_modifier=".cs")
            else:
                tl.store(dst, words, mask=inside)
        else:  # the expert's words are a multiple of WORDS here
            if LOAD == 1:
                words = tl.load(src, cache_modifier=".cg")
            elif LOAD == 2:
                words = tl.load(src, cache_modifier=".cv")
            else:
                words = tl.load(src)
            if STORE == 1:
                tl.store(dst, words, cache_modifier=".cs")
            else:
                tl.store(dst, words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    host = torch.empty(64, EXPERT_WORDS, dtype=torch.int32).pin_memory()
    host.random_()
    store = host_words(host, device)
    pool = torch.empty(16, EXPERT_WORDS, dtype=torch.int32, device=device)
    experts = torch.tensor(EXPERTS, device=device)
    slots = torch.arange(len(EXPERTS), device=device)
    count = torch.tensor([len(EXPERTS)], device=device)
    want = host[EXPERTS].to(device)
    nbytes = len(EXPERTS) * EXPERT_WORDS * 4

    def engine():
        for j, e in enumerate(EXPERTS):
            pool[j].copy_(host[e], non_blocking=True)

    rows = [{"variant": "copy engine, 8 async copies", "ms": timed(engine, [])}]
    pool.zero_()

    def run(words, warps, axis, load, store_mode, masked):
        pieces = triton.cdiv(EXPERT_WORDS, words)
        grid = (len(EXPERTS), pieces) if axis == 0 else (pieces, len(EXPERTS))
        _variant[grid](store, pool, experts, slots, count, EXPERT_WORDS, WORDS=words, EXPERT_AXIS=axis, LOAD=load,
                       STORE=store_mode, MASKED=masked, num_warps=warps)

    def measure(words, warps, axis, load=0, store_mode=0, masked=True):
        pool.zero_()
        ms = timed(lambda: run(words, warps, axis, load, store_mode, masked), [])
        assert torch.equal(pool[:len(EXPERTS)], want), (words, warps, axis, load, store_mode, masked)
        row = {"variant": f"words {words}, warps {warps}, experts on axis {axis}, load {load}, store {store_mode}, "
                          f"masked {masked}", "words": words, "warps": warps, "axis": axis, "load": load,
               "store": store_mode, "masked": masked, "ms": ms}
        rows.append(row)
        return row

    shapes = [measure(w, n, a) for w, n, a in itertools.product([2048, 4096, 8192, 16384], [4, 8, 16], [0, 1])]
    best = sorted(shapes, key=lambda r: r["ms"])[:3]
    for r in best:
        for load, store_mode in itertools.product([0, 1, 2], [0, 1]):
            if (load, store_mode) != (0, 0):
                measure(r["words"], r["warps"], r["axis"], load, store_mode)
        if EXPERT_WORDS % r["words"] == 0:
            measure(r["words"], r["warps"], r["axis"], masked=False)
    for r in rows:
        r["gbps"] = nbytes / r["ms"] / 1e6
    result = {"machine": torch.cuda.get_device_name(device), "bytes": nbytes, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['machine']}: 8 OLMoE experts ({nbytes / 1e6:.0f} MB), pinned host -> device slots")
    print(f"{'ms':>7}{'GB/s':>7}  variant (the current kernel: words 8192, warps 4, experts on axis 0, load 0, "
          "store 0, masked)")
    for r in rows[:1] + sorted(rows[1:], key=lambda r: r["ms"]):
        print(f"{r['ms']:>7.3f}{r['gbps']:>7.1f}  {r['variant']}")


if __name__ == "__main__":
    main()
