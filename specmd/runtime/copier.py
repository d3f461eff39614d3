"""Copies of experts from the host store into device slots, and the ordering that makes them safe.

Protocol note (the one place it is written; engines, the cache and the README point here).
Streams:
  - the *compute stream*: whichever stream the model runs on at each layer (read from
    ``torch.cuda.current_stream`` at every call, so a generate under another stream context is ordered too);
  - ``_demand_stream`` (high priority): copies of demand misses, issued by the model's thread;
  - ``_prefetch_stream``: prefetch copies, issued by the model's thread or by the watchdog thread.
Events, per slot ``s``:
  - ``ready[s]``: recorded by ``copy`` on the copy stream right after the copy into ``s``; waited on by
    ``order_reads`` on the compute stream before any read of ``s``, and by the next copy into ``s`` when that
    runs on the other copy stream (same-stream copies are ordered by the stream itself).
  - ``last_use[s]``: recorded by ``end_reads`` on the compute stream after the last queued read of ``s``;
    waited on by the next ``copy`` into ``s`` on its copy stream before ``s`` is overwritten.
  - timing pairs (start, end) around each copy (copy stream) and each wait (compute stream): read by
    ``drain``; a prefetch copy's end event also bounds the prefetch copies in flight (``room``).
The host never waits for a copy: a slot is published as soon as its copy is queued, because every reader
first makes the compute stream wait on ``ready``. Only the watchdog thread ever blocks, on
``oldest_inflight`` while no prefetch room is left, outside any lock. Expert weights are read-only: eviction never copies back.
Locking: every method is called under ``SlotCache``'s lock, which therefore
guards this object's lists too. The watchdog's queue has its own condition (``engines/watchdog.py``).

Link emulation (benchmarks): each copy is followed by a GPU sleep on its stream, and copies wait for each
other (one emulated link), so a copy lasts as long as on the slower link (``bench/linkemu.py``).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from .adapters import ExpertLayout
from .store import HostStore, layout_views

Key = tuple[int, int]  # (MoE layer, expert)

# Timing events are kept until ``drain``; past this many it resolves the finished ones early so a long
# run does not hoard events.
_MAX_PENDING_TIMINGS = 4096


class SlotPool:
    """``num_slots`` expert-sized slots on ``device``: [S, block], and views shaped like the model's fused
    parameters ([S, 2I, H] and so on)."""

    def __init__(self, layout: ExpertLayout, num_slots: int, device: torch.device) -> None:
        # A normal tensor even when offload runs under inference_mode: the watchdog thread (not in inference
        # mode) and a later generate (no_grad only) must be allowed to copy into it.
        with torch.inference_mode(False):
            self.data = torch.empty(num_slots, layout.block_numel, dtype=layout.dtype, device=device)
        self.views = layout_views(self.data, layout)
        self.layout = layout

    def free(self) -> None:
        """Drop the device memory (the pool is unusable after)."""
        self.data = torch.empty(0, device=self.data.device)
        self.views = {}


class Copier:
    """No copies at all: what the simulator drives the cache with (a subclass learns of each copy). Also the
    interface every copier implements; each method is called under the cache's lock."""

    asynchronous = False  # True: ``copy`` returns before the copy finishes (the model's thread may issue it)
    peak_inflight = 0  # the most prefetch copies in flight at once

    def copy(self, slot: int, key: Key, demand: bool) -> None:
        """Queue the copy of ``key`` into ``slot``, after every queued read of the slot's previous occupant."""

    def begin_reads(self) -> bool:
        """A layer is about to read slots; True when the reading stream changed since the last call, so
        every resident slot must be ordered before it afresh."""
        return False

    def order_reads(self, layer: int, slots: Sequence[int], timed: bool) -> None:
        """Make the reader wait for the copies into ``slots`` (``timed``: measure the wait for ``layer``)."""

    def end_reads(self, slots: Sequence[int]) -> None:
        """The reads of ``slots`` are queued; a later copy into one of them waits for them."""

    def still_copying(self, slot: int) -> bool:
        """Whether the last copy into ``slot`` may still run (a query, no sync)."""
        return False

    def room(self) -> int | None:
        """How many more prefetch copies may start now (None: no bound)."""
        return None

    def oldest_inflight(self) -> torch.cuda.Event | None:
        """The end event of the oldest prefetch copy that may still run; the watchdog thread waits on it
        outside the lock when ``room`` is 0."""
        return None

    def emulate_link(self, stretch_cycles: int) -> None:
        """Stretch every later copy by ``stretch_cycles`` GPU clock cycles and serialize copies (0: off)."""
        if stretch_cycles:
            raise ValueError("link emulation needs CUDA (it sleeps on the copy streams)")

    def drain(self, block: bool) -> tuple[float, dict[int, float]]:
        """(copy-busy ms, {layer: stall ms}) of the timings finished since the last drain; ``block``
        synchronizes the device first."""
        return 0.0, {}

    def close(self) -> None:
        """Wait for queued copies (changes state)."""


class HostCopier(Copier):
    """Plain synchronous copies: slots in ordinary memory, no streams (CPU)."""

    def __init__(self, store: HostStore, pool: SlotPool) -> None:
        self._store = store
        self._pool = pool

    def copy(self, slot: int, key: Key, demand: bool) -> None:
        self._pool.data[slot].copy_(self._store.block(*key))


class CudaCopier(Copier):
    """Asynchronous copies on two side streams, ordered by per-slot events (see the protocol note)."""

    asynchronous = True

    def __init__(self, store: HostStore, pool: SlotPool, device: torch.device, max_inflight: int | None) -> None:
        self._store = store
        self._pool = pool
        self.device = device
        num_slots = pool.data.shape[0]
        self._demand_stream = torch.cuda.Stream(device, priority=-1)  # demand copies; never behind prefetches
        self._prefetch_stream = torch.cuda.Stream(device)  # prefetch copies
        self._ready = [torch.cuda.Event() for _ in range(num_slots)]  # see the protocol note
        self._last_use = [torch.cuda.Event() for _ in range(num_slots)]  # see the protocol note
        # The copy stream that last wrote each slot: a copy on the same stream is ordered after it without
        # waiting on ``ready`` (every CUDA call costs the host microseconds under the GIL).
        self._copied_on: list[torch.cuda.Stream | None] = [None] * num_slots
        self._reader: torch.cuda.Stream | None = None  # the compute stream of the last ``begin_reads``
        self._copy_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_timings: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        # Timing events already read, reused: creating one costs ~4 us of host time (H100, torch 2.11).
        self._spare_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        # End events of prefetch copies that may still run, oldest first.
        self.max_inflight = max_inflight
        self._inflight: deque[torch.cuda.Event] = deque()
        self.peak_inflight = 0
        self._busy_ms, self._stall_ms = 0.0, {}  # finished timings not yet handed out by ``drain``
        self._stretch_cycles = 0
        self._link_free = torch.cuda.Event()  # recorded after each emulated copy; the next one waits on it

    def copy(self, slot: int, key: Key, demand: bool) -> None:
        stream = self._demand_stream if demand else self._prefetch_stream
        with torch.cuda.stream(stream):
            start, end = self._timing_pair()
            stream.wait_event(self._last_use[slot])
            if self._copied_on[slot] is not stream:
                stream.wait_event(self._ready[slot])
                self._copied_on[slot] = stream
            if self._stretch_cycles:
                stream.wait_event(self._link_free)
            start.record(stream)
            self._pool.data[slot].copy_(self._store.block(*key), non_blocking=True)
            if self._stretch_cycles:
                torch.cuda._sleep(self._stretch_cycles)
                self._link_free.record(stream)
            end.record(stream)
            self._ready[slot].record(stream)
        self._copy_timings.append((start, end))
        if not demand:
            self._prune_inflight()
            self._inflight.append(end)
            self.peak_inflight = max(self.peak_inflight, len(self._inflight))
        if len(self._copy_timings) > _MAX_PENDING_TIMINGS:
            self._collect(block=False)

    def begin_reads(self) -> bool:
        compute = torch.cuda.current_stream(self.device)
        changed = compute != self._reader
        self._reader = compute
        return changed

    def order_reads(self, layer: int, slots: Sequence[int], timed: bool) -> None:
        if not slots:
            return
        compute = self._reader
        start = end = None
        if timed:
            start, end = self._timing_pair()
            start.record(compute)
        for slot in slots:
            compute.wait_event(self._ready[slot])
        if timed:
            end.record(compute)
            self._stall_timings.append((layer, start, end))
            if len(self._stall_timings) > _MAX_PENDING_TIMINGS:
                self._collect(block=False)

    def end_reads(self, slots: Sequence[int]) -> None:
        # Recorded on the stream the model runs on now; reads of the slot still queued on another stream
        # (overlapping generates on two streams, with no sync between) are not covered.
        compute = torch.cuda.current_stream(self.device)
        for slot in slots:
            self._last_use[slot].record(compute)

    def still_copying(self, slot: int) -> bool:
        return not self._ready[slot].query()

    def room(self) -> int | None:
        if self.max_inflight is None:
            return None
        self._prune_inflight()
        return self.max_inflight - len(self._inflight)

    def oldest_inflight(self) -> torch.cuda.Event:
        return self._inflight[0]

    def emulate_link(self, stretch_cycles: int) -> None:
        self._stretch_cycles = int(stretch_cycles)

    def drain(self, block: bool) -> tuple[float, dict[int, float]]:
        self._collect(block)
        drained = self._busy_ms, self._stall_ms
        self._busy_ms, self._stall_ms = 0.0, {}
        return drained

    def close(self) -> None:
        torch.cuda.synchronize(self.device)  # both copy streams and whichever streams read the pool

    def _prune_inflight(self) -> None:
        while self._inflight and self._inflight[0].query():
            self._inflight.popleft()

    def _collect(self, block: bool) -> None:
        """Move finished timings into the totals ``drain`` hands out; recycle their events."""
        if block:
            torch.cuda.synchronize(self.device)
        # A prefetch's end event also bounds the copies in flight: reuse it only once it left that list.
        self._prune_inflight()
        inflight = {id(event) for event in self._inflight}
        keep_copies, keep_stalls = [], []
        for start, end in self._copy_timings:
            if block or end.query():
                self._busy_ms += start.elapsed_time(end)
                if id(end) not in inflight:
                    self._spare_timings.append((start, end))
            else:
                keep_copies.append((start, end))
        for layer, start, end in self._stall_timings:
            if block or end.query():
                self._stall_ms[layer] = self._stall_ms.get(layer, 0.0) + start.elapsed_time(end)
                self._spare_timings.append((start, end))
            else:
                keep_stalls.append((layer, start, end))
        self._copy_timings, self._stall_timings = keep_copies, keep_stalls

    def _timing_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if self._spare_timings:
            return self._spare_timings.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def make_copier(store: HostStore, pool: SlotPool, device: torch.device, max_inflight: int | None) -> Copier:
    """The copier for ``device``: asynchronous on CUDA, plain copies elsewhere."""
    if device.type == "cuda":
        return CudaCopier(store, pool, device, max_inflight)
    return HostCopier(store, pool)
