"""The main loop's schedule, shared by the threaded engine and the simulator (and the graph engine to come).

A forward pass calls the MoE layers in order; a call of a layer at or before the previous one starts the
next pass. Every call gets an absolute position (pass * layers + layer) that only grows, which is what a
prefetch names as its deadline. A layer is *entered* when it is called and *started* once its routed ids
are known (for a live engine: after the host sync), from when on the prefetches predicted for it are
stale. A layer that needs more experts than there are slots runs in chunks (long prefills at small
budgets): acquire, compute, release, next chunk; never fail for lack of slots, never exceed the budget.
The layer's prefetches are submitted once its first chunk's demand copies are queued, so a demand copy
never waits behind a prefetch issued for the same layer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..cache import SlotCache
from ..device_cache import DeviceCache
from ..prefetch import PrefetchRequest


class PassClock:
    """Numbers the MoE layer calls of one model: forward passes and absolute positions (every engine)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.forward_passes = 0  # counted for stats; reset_stats zeroes it
        self._last_layer = num_layers  # so the first call starts a pass
        self._pass_index = 0  # never reset: positions must only grow

    def enter(self, layer: int) -> tuple[int, bool]:
        """Count a call of MoE ``layer``: (its absolute position, whether it starts a forward pass)."""
        new_pass = layer <= self._last_layer
        if new_pass:
            self.forward_passes += 1
            self._pass_index += 1
        self._last_layer = layer
        return self._pass_index * self.num_layers + layer, new_pass


class MainLoop:
    """Pass and position bookkeeping of one model, and the chunked acquire/compute/release of a layer, over
    either cache (the slot cache of the threaded engine and the simulator, the device cache of the graph
    engine)."""

    def __init__(self, cache: SlotCache | DeviceCache, num_layers: int,
                 submit: Callable[[list[PrefetchRequest]], None]) -> None:
        self.cache = cache
        self.num_layers = num_layers
        self.clock = PassClock(num_layers)
        self._submit = submit

    def enter(self, layer: int) -> tuple[int, bool]:
        """``PassClock.enter``; a new pass also restarts the cache's collision counting (changes state)."""
        position, new_pass = self.clock.enter(layer)
        if new_pass:
            self.cache.begin_pass()
        return position, new_pass

    def start(self, layer: int, position: int) -> None:
        """``layer`` runs from now on: prefetches for its position are stale."""
        self.cache.set_position(position, layer, self.num_layers)

    def run(self, layer: int, experts: Sequence[int], requests: list[PrefetchRequest],
            compute: Callable[[Sequence[int], list[int]], None]) -> None:
        """Make the distinct ``experts`` of ``layer`` resident chunk by chunk, calling ``compute(chunk, slots)``
        while each chunk is held; ``requests`` are submitted after the first chunk's acquire."""
        width = self.cache.num_slots
        for start in range(0, len(experts), width):
            chunk = experts[start:start + width]
            slots = self.cache.acquire(layer, chunk)
            try:  # a failure mid-chunk must not leave slots IN_USE for good
                if start == 0 and requests:
                    self._submit(requests)
                compute(chunk, slots)
            finally:
                self.cache.release(slots)
