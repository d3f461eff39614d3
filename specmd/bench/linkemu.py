"""Emulating a slower host->device link than the machine's: the arithmetic.

A copy of ``n`` bytes takes n / native on this machine; on a profile's link it would take n / target.
The copier (``runtime/copier.py``, set through ``model.specmd.emulate_link``) stretches each copy by the
difference, as a GPU-side sleep queued right after the copy, so that overlap with compute behaves as on
the slower link. The sleep is in GPU clock cycles, converted with a rate calibrated on the machine
(``torch.cuda._sleep``).
"""
from __future__ import annotations


def stretch_seconds(nbytes: int, native_gbps: float, target_gbps: float) -> float:
    """Extra seconds after a copy of ``nbytes`` so it lasts as long as on ``target_gbps`` (0 when the target
    is at least as fast as the machine: a faster link cannot be emulated)."""
    if native_gbps <= 0 or target_gbps <= 0:
        raise ValueError("link rates must be positive")
    return max(0.0, nbytes / (target_gbps * 1e9) - nbytes / (native_gbps * 1e9))


def sleep_cycles(seconds: float, cycles_per_second: float) -> int:
    """GPU sleep cycles for ``seconds``, given a calibrated rate; rounded to the nearest cycle."""
    if cycles_per_second <= 0:
        raise ValueError("cycles_per_second must be positive (calibrate it on the GPU)")
    return max(0, round(seconds * cycles_per_second))


def achieved_gbps(nbytes: int, seconds: float) -> float:
    """Rate of a measured copy, in 1e9 bytes per second."""
    if seconds <= 0:
        raise ValueError("a copy takes a positive time")
    return nbytes / seconds / 1e9
