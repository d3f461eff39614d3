"""How many programs a prefetch gather needs, and whether compute beside it is delayed (issue 11, on the GPU).

One OLMoE-1B-7B layer's experts (64 x 12.6 MB bf16) in pinned memory, 8 of them gathered into device slots
by ``kernels/miss_gather.py`` on a side stream, with the full grid (``programs`` 0) or bounded to N programs;
beside it, on the main stream, a stand-in for one decode layer's compute (10 batched products over 8 experts'
weights already on the device, about what the compiled step spends per layer). Per setting, the median of
20 repeats, CUDA events: the gather alone (its GB/s), the compute alone, and both started together (the
time until both are done; "hidden" is the share of the compute that ran inside the gather's time).

    python benchmarks/gather_programs.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from specmd.runtime.gather import host_words
from specmd.runtime.kernels import kernel

EXPERT_WORDS = 3 * 2048 * 1024 * 2 // 4  # OLMoE: gate, up, down of 2048 x 1024 bf16, as 32-bit words
REPEATS = 20


def timed(fn, streams) -> float:
    """Milliseconds from the start to the end of everything ``fn`` queues on ``streams`` (median of REPEATS)."""
    main = torch.cuda.current_stream()
    times = []
    for _ in range(REPEATS + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for s in streams:
            s.wait_stream(main)
        fn()
        for s in streams:
            main.wait_stream(s)
        end.record(main)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    gather = kernel("miss_gather")
    host = torch.empty(64, EXPERT_WORDS, dtype=torch.int32).pin_memory()
    host.random_()
    store = host_words(host, device)
    pool = torch.empty(16, EXPERT_WORDS, dtype=torch.int32, device=device)
    experts = torch.tensor([3, 17, 29, 31, 40, 44, 52, 60], device=device)
    slots = torch.arange(8, device=device)
    count = torch.tensor([8], device=device)
    weights = torch.randn(8, 2048, 2048, dtype=torch.bfloat16, device=device)
    x = torch.randn(8, 1, 2048, dtype=torch.bfloat16, device=device)
    side = torch.cuda.Stream(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count

    def compute():
        y = x
        for _ in range(10):
            y = torch.bmm(y, weights)

    def copy(programs):
        with torch.cuda.stream(side):
            gather.gather_misses(store, pool, experts, slots, count, programs)

    compute_ms = timed(compute, [])
    rows = []
    for programs in [0, sms // 8, sms // 4, sms // 2, sms, 2 * sms]:
        gather_ms = timed(lambda: copy(programs), [side])
        both_ms = timed(lambda: (copy(programs), compute()), [side])
        hidden = (gather_ms + compute_ms - both_ms) / compute_ms
        rows.append({"programs": programs, "gather_ms": gather_ms, "gbps": 8 * EXPERT_WORDS * 4 / gather_ms / 1e6,
                     "compute_ms": compute_ms, "both_ms": both_ms, "hidden": hidden})
        assert torch.equal(pool[:8].cpu(), host[experts.cpu()])
    result = {"machine": torch.cuda.get_device_name(device), "sms": sms, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['machine']}, {sms} SMs; 8 OLMoE experts (101 MB) gathered beside 10 bmm [8,1,2048]x[8,2048,2048]")
    print(f"{'programs':>9}{'gather ms':>11}{'GB/s':>7}{'compute ms':>12}{'both ms':>9}{'hidden':>8}")
    for r in rows:
        name = "full" if r["programs"] == 0 else str(r["programs"])
        print(f"{name:>9}{r['gather_ms']:>11.3f}{r['gbps']:>7.1f}{r['compute_ms']:>12.3f}{r['both_ms']:>9.3f}"
              f"{100 * r['hidden']:>7.0f}%")


if __name__ == "__main__":
    main()
