"""Eviction policies as tensor operations, for the cache decided on the device (``device_cache.py``).

Each one keeps its state in device tensors, one entry per slot (and, for LFU, per key) plus one spare entry
that masked writes land in (static shapes, no host sync), and answers with two sort keys per slot (primary,
then secondary): the slots sorted by them, smallest first, are the victims in the order the Python policy
of the same name (``policies.py``) would pick them. That holds because, within one call, the Python
policies only change the state of the keys the call pins, which are never victims; so the whole call's
victims are the first slots of one sort, and its accesses update the state afterwards in ascending expert
order (the order the main loop acquires them), each at its own tick of one clock.
"""
from __future__ import annotations

import torch


class DevicePolicy:
    """State and sort key of one policy over ``num_slots`` slots and ``num_keys`` (layer, expert) keys."""

    name = ""
    kernel_id = 0  # the policy's number in kernels/cache_access.py
    touches_predicted = False  # whether a prediction of a resident expert changes its state (SlotCache.touch)

    def __init__(self, num_slots: int, num_keys: int, device: torch.device) -> None:
        self.last = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)  # clock of the last access

    def sort_keys(self, owner: torch.Tensor, layer: int, num_layers: int,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(primary, secondary) [S + 1] int64 each; smaller is evicted first. ``owner`` [S + 1]: the flat key
        in each slot (-1: none)."""
        return torch.zeros_like(self.last), self.last

    def update(self, slots: torch.Tensor, keys: torch.Tensor, ticks: torch.Tensor, inserted: torch.Tensor) -> None:
        """Record one call's accesses (changes state). [E] each: ``slots`` the slot of each accessed expert (the
        spare entry S for the others), ``keys`` its flat key (the spare key for the others), ``ticks`` its
        clock tick, ``inserted`` whether it was a miss."""
        self.last.index_put_((slots,), ticks)

    def begin_pass(self) -> None:
        """A new forward pass starts (changes state for pass-aware policies)."""

    def kernel_state(self) -> list[torch.Tensor]:
        """What ``kernels/cache_access.py`` takes: last use, LFU counts, least-stale touched pass and pass number
        (``last`` stands in where the policy keeps none: the kernel never reads it there)."""
        return [self.last] * 4


class DeviceLRU(DevicePolicy):
    name = "lru"


class DeviceFIFO(DevicePolicy):
    name = "fifo"
    kernel_id = 1

    def update(self, slots, keys, ticks, inserted) -> None:
        self.last.index_put_((slots,), torch.where(inserted, ticks, self.last[slots]))  # only insertions move


class DeviceLFU(DevicePolicy):
    """Counts per key survive eviction, as in ``policies.LFU``; ties to the least recently used."""

    name = "lfu"
    kernel_id = 2

    def __init__(self, num_slots: int, num_keys: int, device: torch.device) -> None:
        super().__init__(num_slots, num_keys, device)
        self.count = torch.zeros(num_keys + 1, dtype=torch.int64, device=device)

    def sort_keys(self, owner, layer, num_layers, num_experts) -> tuple[torch.Tensor, torch.Tensor]:
        return self.count[owner.clamp(min=0)], self.last

    def update(self, slots, keys, ticks, inserted) -> None:
        super().update(slots, keys, ticks, inserted)
        self.count.index_put_((keys,), torch.ones_like(keys), accumulate=True)

    def kernel_state(self) -> list[torch.Tensor]:
        return [self.last, self.count, self.last, self.last]


class DeviceLayerDistance(DevicePolicy):
    """The key whose layer runs furthest ahead (cyclically) first; ties to the least recently used."""

    name = "layer-distance"
    kernel_id = 3

    def sort_keys(self, owner, layer, num_layers, num_experts) -> tuple[torch.Tensor, torch.Tensor]:
        distance = (torch.div(owner.clamp(min=0), num_experts, rounding_mode="floor") - layer) % num_layers
        return num_layers - distance, self.last


class DeviceLeastStale(DevicePolicy):
    """Stale (not touched in this pass) before current; inside each, oldest first touch in the latest pass."""

    name = "least-stale"
    kernel_id = 4
    touches_predicted = True

    def __init__(self, num_slots: int, num_keys: int, device: torch.device) -> None:
        super().__init__(num_slots, num_keys, device)
        self.touched_pass = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)
        self.pass_number = torch.zeros((), dtype=torch.int64, device=device)

    def sort_keys(self, owner, layer, num_layers, num_experts) -> tuple[torch.Tensor, torch.Tensor]:
        current = (self.touched_pass == self.pass_number).to(torch.int64)
        return current, self.last  # ``last`` holds the first touch in the latest pass here

    def update(self, slots, keys, ticks, inserted) -> None:
        fresh = inserted | (self.touched_pass[slots] != self.pass_number)
        self.last.index_put_((slots,), torch.where(fresh, ticks, self.last[slots]))
        self.touched_pass.index_put_((slots,), self.pass_number.expand_as(slots))

    def begin_pass(self) -> None:
        self.pass_number += 1

    def kernel_state(self) -> list[torch.Tensor]:
        return [self.last, self.last, self.touched_pass, self.pass_number]


DEVICE_POLICIES: dict[str, type[DevicePolicy]] = {
    cls.name: cls for cls in (DeviceLRU, DeviceFIFO, DeviceLFU, DeviceLayerDistance, DeviceLeastStale)
}
