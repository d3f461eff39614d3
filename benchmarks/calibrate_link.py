"""Check the link emulation's calibration on the GPU: native rate of an expert-sized pinned copy, the
GPU sleep's clock, and each profile's stretch with the rate it achieves.

    python benchmarks/calibrate_link.py
"""
from __future__ import annotations

import torch

from specmd.bench.timing import calibrate_link, copy_gbps, sleep_cycles_per_second
from specmd.study.costmodel import LinkProfile

EXPERT_BYTES = 12_582_912  # one OLMoE-1B-7B expert in bf16

if __name__ == "__main__":
    device = torch.device("cuda", 0)
    cps = sleep_cycles_per_second(device)
    print(f"native {copy_gbps(EXPERT_BYTES, device):.1f} GB/s; sleep clock {cps / 1e9:.3f} GHz")
    for name in ("pcie-gen3-x16", "pcie-gen4-x16"):
        target = LinkProfile.load(name).link_gbps
        cycles, measured, native = calibrate_link(EXPERT_BYTES, target, device, cps)
        print(f"{name}: target {target:.1f} GB/s, native now {native:.1f}, stretch {cycles} cycles, "
              f"measured {measured:.1f} GB/s")
