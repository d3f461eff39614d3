"""GPU timing for the benchmarks: CUDA-synchronised generate timing (TTFT, TPOT), pinned copy rates, and the
calibration of link emulation (``linkemu``) against the machine's own link."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .linkemu import achieved_gbps, sleep_cycles, stretch_seconds


@dataclass(frozen=True)
class Timed:
    ttft_ms: float
    tpot_ms: float
    tokens: torch.Tensor
    peak_vram_bytes: int
    outputs: tuple[torch.Tensor, ...] = ()  # every full-length generate's tokens, warm-up included, in order

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.tpot_ms if self.tpot_ms > 0 else 0.0  # 0: not measured (one token), not infinite


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate, device synchronized before and after, and its output."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    _sync(ids.device)
    return time.perf_counter() - start, out


def replay_seconds(model, prompts, vocab_size: int, device: torch.device, prefill_only: bool = False) -> float:
    """Seconds to generate a trace's ``prompts`` ((tokens, decode steps) each) under the routing replay the
    caller set on ``model.specmd``: random token ids (the trace decides the routing), each prompt with its
    decode steps + 1 new tokens (one with ``prefill_only``, whose replay must then hold the prefills alone,
    ``RoutingTrace.prefills``), greedy; the device synchronized before and after. Raises unless the replay
    ran exactly the prompts' passes, from its start."""
    gen = torch.Generator().manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    for tokens, decode in prompts:
        ids = torch.randint(3, min(50000, vocab_size), (1, tokens), generator=gen).to(device)
        new = 1 if prefill_only else decode + 1
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    _sync(device)
    seconds = time.perf_counter() - start
    replay = model.specmd.engine.replay
    expected = len(prompts) if prefill_only else sum(1 + decode for _, decode in prompts)
    wrong = int(getattr(replay, "wrong", 0))  # the graph engine's compiled steps that could not replay
    if replay is None or replay.passes_done != expected or wrong:
        raise RuntimeError(f"routing replay: {expected} forward passes expected, "
                           f"{replay.passes_done if replay is not None else 0} replayed ({wrong} compiled steps "
                           "met a pass they could not replay): set model.specmd.replay_routing(trace) first, "
                           "with the trace these prompts came from")
    return seconds


def measure(model, ids: torch.Tensor, new_tokens: int, repeats: int, ttft_repeats: int = 2,
            before_last=None, warmup_tokens: int | None = None) -> Timed:
    """Warm-up (full length unless ``warmup_tokens``), TTFT (median of one-token generates), TPOT from
    the median full generate; ``outputs``: the tokens of every full-length one. ``before_last`` runs before
    the last full generate (e.g. to zero counters so they cover it)."""
    device = ids.device
    _, warm = timed_generate(model, ids, warmup_tokens or new_tokens)
    outputs = [warm] if warm.shape[-1] == ids.shape[-1] + new_tokens else []
    ttft = statistics.median(timed_generate(model, ids, 1)[0] for _ in range(ttft_repeats))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, out = [], None
    for i in range(repeats):
        if i == repeats - 1 and before_last is not None:
            before_last()
        seconds, out = timed_generate(model, ids, new_tokens)
        totals.append(seconds)
        outputs.append(out)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    tpot = (statistics.median(totals) - ttft) / max(1, new_tokens - 1)
    return Timed(ttft * 1e3, tpot * 1e3, out, peak, tuple(outputs))


def copy_gbps(nbytes: int, device: torch.device, stretch_cycles: int = 0, repeats: int = 21,
              warmup: int = 10) -> float:
    """Median rate of a pinned host->device copy of ``nbytes`` on a side stream, stretched as the cache
    stretches its copies when ``stretch_cycles`` > 0. The first ``warmup`` copies are not counted: on
    the 2026-11-23 H100 a cold measurement read 27.7 GB/s where warm copies ran at 41-45 GB/s."""
    source = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    times = []
    with torch.cuda.stream(stream):
        for _ in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            target.copy_(source, non_blocking=True)
            if stretch_cycles:
                torch.cuda._sleep(stretch_cycles)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return achieved_gbps(nbytes, statistics.median(times[warmup:]))


def calibrate_link(nbytes: int, target_gbps: float, device: torch.device, cycles_per_second: float,
                   tolerance: float = 0.05, steps: int = 4) -> tuple[int, float, float]:
    """(stretch cycles, measured emulated GB/s, native GB/s) so a stretched copy of ``nbytes`` runs at
    ``target_gbps``: the stretch from the native rate measured now, then corrected against the measured
    stretched rate until within ``tolerance`` (the sleep's clock and the copy both drift)."""
    native = copy_gbps(nbytes, device)
    cycles = sleep_cycles(stretch_seconds(nbytes, native, target_gbps), cycles_per_second)
    measured = copy_gbps(nbytes, device, cycles) if cycles else native
    for _ in range(steps):
        if abs(measured / target_gbps - 1) <= tolerance or (not cycles and measured < target_gbps):
            break
        missing = nbytes / (target_gbps * 1e9) - nbytes / (measured * 1e9)  # seconds per copy still off
        cycles = max(0, cycles + round(missing * cycles_per_second))
        measured = copy_gbps(nbytes, device, cycles) if cycles else copy_gbps(nbytes, device)
    return cycles, measured, native


def sleep_cycles_per_second(device: torch.device) -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep``, timed with CUDA events."""
    cycles = 50_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(1_000_000)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)
