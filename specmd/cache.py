"""The device slot pool under a fixed byte budget: slot table, slot states, copies and eviction.

Only this module touches slots, the free list and the (layer, expert) -> slot table.

Slot lifecycle: FREE -> READY (copy queued on the copy stream, ``ready`` event recorded after it) ->
IN_USE (pinned by the layer being computed) -> READY again on ``release`` (``last_use`` event recorded
after the compute that read it) -> evicted: the copy stream waits on ``last_use`` before overwriting.
A slot is published in the table as soon as its copy is queued, because every reader first makes the
compute stream wait on ``ready``; the host never blocks on a copy.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from .adapters import ExpertLayout
from .metrics import LayerStats
from .policies import EvictionPolicy
from .store import HostStore, layout_views

Key = tuple[int, int]  # (MoE layer, expert)


class SlotState(enum.Enum):
    FREE = "free"
    READY = "ready"
    IN_USE = "in_use"


class SlotCache:
    """A pool of ``num_slots`` expert-sized slots on ``device``, filled from ``store`` on demand."""

    def __init__(self, store: HostStore, layout: ExpertLayout, num_slots: int, budget_bytes: int,
                 policy: EvictionPolicy, device: torch.device, stats: list[LayerStats]) -> None:
        assert 1 <= num_slots and num_slots * layout.expert_bytes <= budget_bytes
        self.num_slots = num_slots
        self.budget_bytes = budget_bytes
        self.layout = layout
        self.policy = policy
        self.device = device
        self._store = store
        self._stats = stats
        # [S, block]; ``views`` reshape it like the model's fused parameters, [S, 2I, H] and so on.
        self.pool = torch.empty(num_slots, layout.block_numel, dtype=layout.dtype, device=device)
        self.views = layout_views(self.pool, layout)
        self._slot_of: dict[Key, int] = {}
        self._key_of: list[Key | None] = [None] * num_slots
        self._state = [SlotState.FREE] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._ever_loaded: set[Key] = set()
        self._evicted_this_pass: set[Key] = set()
        self._cuda = device.type == "cuda"
        if self._cuda:
            # The stream that runs the model; captured once, so copies are ordered against it.
            self._compute_stream = torch.cuda.current_stream(device)
            # Copies host -> slot run here, so they overlap compute.
            self._copy_stream = torch.cuda.Stream(device)
            # ready[s]: recorded by _load on the copy stream after the copy into s; waited on by acquire
            # on the compute stream before any read of s.
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]
            # last_use[s]: recorded by release on the compute stream after the last queued read of s;
            # waited on by _load on the copy stream before s is overwritten.
            self._last_use = [torch.cuda.Event() for _ in range(num_slots)]
            self._unwaited: set[int] = set()  # slots whose ready event the compute stream has not waited on

    # -- public ---------------------------------------------------------------------------------------

    def begin_pass(self) -> None:
        """A new forward pass starts: collisions are counted afresh (changes state)."""
        self._evicted_this_pass.clear()
        self.policy.begin_pass()

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Make ``experts`` of ``layer`` resident and pinned; return their slots in the same order.

        Hits are counted, misses loaded (evicting with the policy, never a pinned slot). On CUDA the
        compute stream is made to wait for the copies; the host does not block. At most ``num_slots``
        experts at a time; call ``release`` with the returned slots after queueing the compute.
        """
        assert len(experts) <= self.num_slots, "the engine chunks layers wider than the pool"
        stats = self._stats[layer]
        pinned: set[Key] = {(layer, e) for e in experts}
        slots = []
        for expert in experts:
            key = (layer, expert)
            stats.accesses += 1
            slot = self._slot_of.get(key)
            if slot is None:
                self._count_miss(stats, key)
                slot = self._load(key, pinned)
                self.policy.insert(key)
            else:
                stats.hits += 1
                self.policy.lookup(key)
            self._state[slot] = SlotState.IN_USE
            slots.append(slot)
        if self._cuda:
            for slot in slots:
                if slot in self._unwaited:
                    self._compute_stream.wait_event(self._ready[slot])
                    self._unwaited.discard(slot)
        return slots

    def release(self, slots: Sequence[int]) -> None:
        """Unpin ``slots`` once the compute reading them is queued (records their last-use events)."""
        for slot in slots:
            assert self._state[slot] is SlotState.IN_USE
            self._state[slot] = SlotState.READY
            if self._cuda:
                self._last_use[slot].record(self._compute_stream)

    def resident(self) -> dict[Key, int]:
        """A copy of the (layer, expert) -> slot table."""
        return dict(self._slot_of)

    @property
    def occupied_bytes(self) -> int:
        return len(self._slot_of) * self.layout.expert_bytes

    def close(self) -> None:
        """Wait for queued copies, then drop the pool (changes state; the cache is unusable after)."""
        if self._cuda:
            self._copy_stream.synchronize()
            self._compute_stream.synchronize()
        self.pool = torch.empty(0, device=self.device)
        self.views = {}
        self._slot_of.clear()

    # -- private --------------------------------------------------------------------------------------

    def _count_miss(self, stats: LayerStats, key: Key) -> None:
        if key not in self._ever_loaded:
            stats.misses_cold += 1
        elif key in self._evicted_this_pass:
            stats.misses_collision += 1
        else:
            stats.misses_capacity += 1

    def _take_slot(self, pinned: set[Key]) -> int:
        if self._free:
            return self._free.pop()
        victim = self.policy.select_victim(exclude=pinned)
        assert victim is not None, "acquire never pins more keys than there are slots"
        slot = self._slot_of.pop(victim)
        assert self._state[slot] is SlotState.READY, "a pinned slot is never evicted"
        self._key_of[slot] = None
        self._state[slot] = SlotState.FREE
        self.policy.remove(victim)
        self._evicted_this_pass.add(victim)
        self._stats[victim[0]].evictions += 1
        return slot

    def _load(self, key: Key, pinned: set[Key]) -> int:
        slot = self._take_slot(pinned)
        source = self._store.block(*key)
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                # Readers of the previous occupant were queued before last_use: wait for them.
                self._copy_stream.wait_event(self._last_use[slot])
                self.pool[slot].copy_(source, non_blocking=True)
                self._ready[slot].record(self._copy_stream)
            self._unwaited.add(slot)
        else:
            self.pool[slot].copy_(source)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self._state[slot] = SlotState.READY
        self._ever_loaded.add(key)
        self._stats[key[0]].bytes_copied += self.layout.expert_bytes
        # The budget is the contract with the user: check it on every load.
        assert len(self._slot_of) <= self.num_slots and self.occupied_bytes <= self.budget_bytes
        return slot
