"""The slot cache: which expert each device slot holds, each slot's state, the eviction policy and the counters.

Only this module touches the (layer, expert) -> slot table, the slot owners and the slot states. Copies
and their ordering belong to the copier (``copier.py``, which holds the protocol note); the cache decides
*what* goes where and counts it. Two threads call it: the model's thread (``acquire``/``release``, demand
loads, ``submit_prefetches``) and the watchdog (``submit_prefetches``, ``wait_prefetch_room``); one lock,
``_lock``, guards the table, the states, the policy, the counters and the copier.

Slot lifecycle: FREE -> LOADING (copy queued) -> IN_USE (acquired: the reader waits for the copy; pinned)
-> READY (released: its reads are queued) -> IN_USE again on a hit, or evicted (a READY or LOADING slot,
never an IN_USE one). When the model starts reading on another stream, every READY slot becomes LOADING
again: its copy is not yet ordered before that stream. Why a slot may be published as soon as its copy is
queued: the protocol note in ``copier.py``.
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Sequence

from .copier import Copier, Key
from .metrics import LayerStats
from .policies import EvictionPolicy
from .prefetch import PrefetchRequest, nearest_first


class SlotState(enum.Enum):
    FREE = "free"  # holds nothing
    LOADING = "loading"  # its copy is queued and not yet ordered before the current reader
    READY = "ready"  # resident and ordered before the reader; nobody reads it now
    IN_USE = "in_use"  # read by the layer being computed: never evicted


class SlotCache:
    """``num_slots`` expert-sized slots under ``budget_bytes``, filled through ``copier``."""

    def __init__(self, copier: Copier, num_slots: int, expert_bytes: int, budget_bytes: int,
                 policy: EvictionPolicy, stats: list[LayerStats]) -> None:
        assert 1 <= num_slots and num_slots * expert_bytes <= budget_bytes
        self.num_slots = num_slots
        self.expert_bytes = expert_bytes
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.copy_busy_ms = 0.0
        self._copier = copier
        self._stats = stats  # shared with the engine, which counts predictions into it
        self._lock = threading.RLock()
        self._slot_of: dict[Key, int] = {}  # the table
        self._key_of: list[Key | None] = [None] * num_slots  # slot owners
        self._state = [SlotState.FREE] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # the FREE slots; pop() hands out slot 0 first
        self._in_use: set[Key] = set()  # keys of IN_USE slots (kept by _set_state)
        self._ever_loaded: set[Key] = set()
        self._evicted_this_pass: set[Key] = set()
        # Prefetched keys not yet demanded -> the absolute position (pass * layers + layer) they were
        # predicted for; protected from other prefetches until that position has run.
        self._prefetched: dict[Key, int] = {}
        self.position = -1  # absolute position of the layer executing

    # -- the model's thread ----------------------------------------------------------------------------

    def begin_pass(self) -> None:
        """A new forward pass starts: collisions are counted afresh (changes state)."""
        with self._lock:
            self._evicted_this_pass.clear()
            self.policy.begin_pass()

    def set_position(self, position: int, layer: int, num_layers: int) -> None:
        """MoE ``layer`` starts, at absolute ``position``; prefetches for it or earlier are now stale."""
        with self._lock:
            self.position = position
            self.policy.set_layer(layer, num_layers)

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Make the distinct ``experts`` of ``layer`` resident and IN_USE; return their slots in order.

        Hits are counted, misses loaded (evicting with the policy, never an IN_USE slot); the reader is
        ordered after every copy it needs, and the host does not block. At most ``num_slots`` experts at
        a time; call ``release`` with the returned slots once the compute reading them is queued.
        """
        assert len(experts) <= self.num_slots, "the main loop chunks layers wider than the pool"
        with self._lock:
            stats = self._stats[layer]
            if self._copier.begin_reads():  # a new reading stream: every copy is ordered before it afresh
                for slot, state in enumerate(self._state):
                    if state is SlotState.READY:
                        self._state[slot] = SlotState.LOADING
            keys = [(layer, e) for e in experts]
            # The chunk's resident keys are taken first, so loading its misses never evicts them.
            held = {key: self._take(self._slot_of[key]) for key in keys if key in self._slot_of}
            slots, waits, stall = [], [], False  # stall: some copy may still be running; time the wait
            for key in keys:
                stats.accesses += 1
                if key in held:
                    slot = self._slot_of[key]
                    stats.hits += 1
                    self.policy.lookup(key)
                    loading = held[key] is SlotState.LOADING
                    if self._prefetched.pop(key, None) is not None:
                        stats.prefetch_hits += 1
                        if loading and self._copier.still_copying(slot):
                            stats.late_prefetches += 1
                            stall = True
                else:
                    self._count_miss(stats, key)
                    slot = self._load(key, demand=True)
                    self.policy.insert(key)
                    loading = stall = True
                    self._take(slot)
                if loading:
                    waits.append(slot)
                slots.append(slot)
            self._copier.order_reads(layer, waits, timed=stall)
            return slots

    def release(self, slots: Sequence[int]) -> None:
        """The compute reading ``slots`` is queued: they become READY (evictable after those reads)."""
        with self._lock:
            self._copier.end_reads(slots)
            for slot in slots:
                assert self._state[slot] is SlotState.IN_USE
                self._set_state(slot, SlotState.READY)

    # -- either thread: the one prefetch entry pair ------------------------------------------------------

    def submit_prefetches(self, requests: Sequence[PrefetchRequest], copy: bool = True) -> list[PrefetchRequest]:
        """Settle ``requests`` in the one prefetch order (``prefetch.nearest_first``) and return those that
        must wait, in order. Stale requests (their layer ran or runs) are dropped; resident keys tell the
        policy and extend a pending prefetch's protection; with ``copy``, the rest are loaded while the
        copier has room (``copy=False``: nothing is loaded, the caller cannot afford a blocking copy). A
        request for which no slot can be freed without evicting an IN_USE key or a pending prefetch is
        dropped. Never blocks."""
        with self._lock:
            room = self._copier.room() if copy else 0  # None: unbounded
            rest = []
            for request in nearest_first(requests):
                if request.target <= self.position:
                    continue  # the demand path owns it now
                if request.key in self._slot_of:
                    self._predicted_resident(request.key, request.target)
                elif rest or (room is not None and room <= 0):
                    rest.append(request)  # once one request waits, the later ones wait behind it
                elif self._prefetch(request) and room is not None:
                    room -= 1
            return rest

    def wait_prefetch_room(self) -> int | None:
        """Block until the copier has room for another prefetch copy; return how many may start (None: no
        bound). For the watchdog thread only: the model's thread never blocks on a copy."""
        while True:
            with self._lock:
                room = self._copier.room()
                if room is None or room > 0:
                    return room
                oldest = self._copier.oldest_inflight()
            oldest.synchronize()  # outside the lock: the model's thread keeps acquiring meanwhile

    def resident(self) -> dict[Key, int]:
        """A copy of the (layer, expert) -> slot table."""
        with self._lock:
            return dict(self._slot_of)

    def states(self) -> list[SlotState]:
        """A copy of every slot's state."""
        with self._lock:
            return list(self._state)

    @property
    def peak_inflight_prefetches(self) -> int:
        """The most prefetch copies that were in flight at once."""
        return self._copier.peak_inflight

    @property
    def occupied_bytes(self) -> int:
        return len(self._slot_of) * self.expert_bytes

    def emulate_link(self, stretch_cycles: int) -> None:
        """Stretch every later copy by ``stretch_cycles`` GPU cycles (``Copier.emulate_link``)."""
        with self._lock:
            self._copier.emulate_link(stretch_cycles)

    def drain_timings(self, block: bool = True) -> None:
        """Add the copier's finished copy and stall timings to the counters; ``block`` synchronizes first."""
        with self._lock:
            busy, stalls = self._copier.drain(block)
            self.copy_busy_ms += busy
            for layer, ms in stalls.items():
                self._stats[layer].stall_ms += ms

    def reset_timings(self) -> None:
        """Forget timings (changes state); the other counters are reset by their owner."""
        self.drain_timings()
        self.copy_busy_ms = 0.0

    def close(self) -> None:
        """Wait for queued copies and forget every slot (the cache is unusable after)."""
        with self._lock:
            self._copier.close()
            self._slot_of.clear()

    # -- private (lock held) ------------------------------------------------------------------------------

    def _set_state(self, slot: int, state: SlotState) -> None:
        key = self._key_of[slot]
        if state is SlotState.IN_USE:
            self._in_use.add(key)
        else:
            self._in_use.discard(key)
        self._state[slot] = state

    def _take(self, slot: int) -> SlotState:
        """Mark ``slot`` IN_USE; return the state it had."""
        before = self._state[slot]
        self._set_state(slot, SlotState.IN_USE)
        return before

    def _count_miss(self, stats: LayerStats, key: Key) -> None:
        if key not in self._ever_loaded:
            stats.misses_cold += 1
        elif key in self._evicted_this_pass:
            stats.misses_collision += 1
        else:
            stats.misses_capacity += 1

    def _predicted_resident(self, key: Key, target: int) -> None:
        """A prediction for a resident key: tell the policy; a pending prefetch stays protected until the
        later of its targets."""
        self.policy.touch(key)
        if key in self._prefetched:
            self._prefetched[key] = max(self._prefetched[key], target)

    def _prefetch(self, request: PrefetchRequest) -> bool:
        if self._load(request.key, demand=False) is None:
            return False  # every slot is IN_USE or holds a pending prefetch
        self.policy.insert(request.key)
        self._prefetched[request.key] = request.target
        stats = self._stats[request.key[0]]
        stats.prefetches += 1
        stats.prefetch_bytes += self.expert_bytes
        return True

    def _evict(self, demand: bool) -> int | None:
        """A slot for a new copy: a FREE one, else the policy's victim among the slots not IN_USE and (unless
        a demand load finds nothing else) not holding a pending prefetch. None: none for a prefetch."""
        if self._free:
            return self._free.pop()
        protected = {k for k, t in self._prefetched.items() if t > self.position}
        victim = self.policy.select_victim(exclude=self._in_use | protected)
        if victim is None and demand:  # only pending prefetches are left: a demand load may take one
            victim = self.policy.select_victim(exclude=self._in_use)
        if victim is None:
            assert not demand, "acquire never takes more keys than there are slots"
            return None
        slot = self._slot_of.pop(victim)
        assert self._state[slot] is not SlotState.IN_USE, "an IN_USE slot is never evicted"
        self._set_state(slot, SlotState.FREE)
        self._key_of[slot] = None
        self.policy.remove(victim)
        self._evicted_this_pass.add(victim)
        stats = self._stats[victim[0]]
        stats.evictions += 1
        if self._prefetched.pop(victim, None) is not None:
            stats.wasted_prefetch_bytes += self.expert_bytes
        return slot

    def _load(self, key: Key, demand: bool) -> int | None:
        """Copy ``key`` into a FREE or evicted slot, which becomes LOADING; None for a prefetch that finds
        no slot."""
        slot = self._evict(demand)
        if slot is None:
            return None
        self._copier.copy(slot, key, demand)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self._set_state(slot, SlotState.LOADING)
        self._ever_loaded.add(key)
        self._stats[key[0]].bytes_copied += self.expert_bytes
        # The budget is the contract with the user: check it on every load.
        assert len(self._slot_of) <= self.num_slots and self.occupied_bytes <= self.budget_bytes
        return slot
