"""The device slot pool under a fixed byte budget: slot table, slot states, copies and eviction.

Only this module touches slots, the free list and the (layer, expert) -> slot table. Two threads call
it: the model's thread (``acquire``/``release``, demand loads) and the watchdog (``prefetch``); one lock,
``_lock``, guards every table, the policy and the counters. Copies are issued under the lock, so a key
is never visible half-loaded.

Slot lifecycle: FREE -> READY (copy queued on a copy stream, ``ready`` event recorded after it) ->
IN_USE (pinned by the layer being computed) -> READY again on ``release`` (``last_use`` event recorded
after the compute that read it) -> evicted: the next copy into the slot waits on ``last_use`` (its
readers) and on ``ready`` (the previous copy into it, which may be on the other copy stream).
Demand copies and prefetch copies run on two streams, so a demand copy shares the link with the
prefetches already in flight instead of queueing behind them; ``max_inflight_prefetches`` bounds those.
A slot is published in the table as soon as its copy is queued, because every reader first makes the
compute stream wait on ``ready``; the host never blocks on a copy.
"""
from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Sequence

import torch

from .adapters import ExpertLayout
from .metrics import LayerStats
from .policies import EvictionPolicy
from .store import HostStore, layout_views

Key = tuple[int, int]  # (MoE layer, expert)

# Timing events are kept until ``drain_timings``; past this many it resolves the finished ones early
# so a long run does not hoard events.
_MAX_PENDING_TIMINGS = 4096


class SlotState(enum.Enum):
    FREE = "free"
    READY = "ready"
    IN_USE = "in_use"


class SlotCache:
    """A pool of ``num_slots`` expert-sized slots on ``device``, filled from ``store``."""

    def __init__(self, store: HostStore, layout: ExpertLayout, num_slots: int, budget_bytes: int,
                 policy: EvictionPolicy, device: torch.device, stats: list[LayerStats],
                 max_inflight_prefetches: int | None = None) -> None:
        assert 1 <= num_slots and num_slots * layout.expert_bytes <= budget_bytes
        self.num_slots = num_slots
        self.budget_bytes = budget_bytes
        self.layout = layout
        self.policy = policy
        self.device = device
        self._store = store
        self._stats = stats
        self._lock = threading.RLock()
        # [S, block]; ``views`` reshape it like the model's fused parameters, [S, 2I, H] and so on.
        # A normal tensor even when offload runs under inference_mode: the watchdog thread (not in
        # inference mode) and a later generate (no_grad only) must be allowed to copy into it.
        with torch.inference_mode(False):
            self.pool = torch.empty(num_slots, layout.block_numel, dtype=layout.dtype, device=device)
        self.views = layout_views(self.pool, layout)
        self._slot_of: dict[Key, int] = {}
        self._key_of: list[Key | None] = [None] * num_slots
        self._state = [SlotState.FREE] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._pinned: set[Key] = set()
        self._ever_loaded: set[Key] = set()
        self._evicted_this_pass: set[Key] = set()
        # Prefetched keys not yet demanded -> the absolute position (pass * layers + layer) they were
        # predicted for; protected from other prefetches until that position has run.
        self._prefetched: dict[Key, int] = {}
        self.position = -1  # absolute position of the layer executing; set by the engine
        self._cuda = device.type == "cuda"
        if self._cuda:
            # Copies host -> slot run on these, so they overlap compute: demand misses on the first
            # (high priority), prefetches on the second.
            self._demand_stream = torch.cuda.Stream(device, priority=-1)
            self._prefetch_stream = torch.cuda.Stream(device)
            # ready[s]: recorded by _load on its copy stream after the copy into s; waited on by acquire
            # on the compute stream before any read of s, and by the next copy into s.
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]
            # last_use[s]: recorded by release on the compute stream after the last queued read of s;
            # waited on by _load on a copy stream before s is overwritten.
            self._last_use = [torch.cuda.Event() for _ in range(num_slots)]
            self._unwaited: set[int] = set()  # slots whose ready event the compute stream has not waited on
            self._compute_stream: torch.cuda.Stream | None = None  # the one _unwaited refers to
            # The copy stream that last wrote each slot: a copy on the same stream is ordered after it
            # without waiting on ``ready`` (every CUDA call costs the host microseconds under the GIL).
            self._copied_on: list[torch.cuda.Stream | None] = [None] * num_slots
            # (start, end) timing events: copies on the copy stream; stalls (layer, ...) on the compute stream.
            self._copy_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
            self._stall_timings: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
            # Timing events already read, reused: creating one costs ~4 us of host time (H100, torch 2.11).
            self._spare_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        # End events of prefetch copies that may still run (oldest first); the watchdog waits on the
        # oldest while there are max_inflight_prefetches of them.
        self.max_inflight_prefetches = max_inflight_prefetches
        self._inflight: deque[torch.cuda.Event] = deque()
        self.peak_inflight_prefetches = 0
        # Link emulation (benchmarks): each copy is followed by a GPU sleep on its stream, and copies
        # wait for each other (one emulated link), so a copy lasts as long as on the slower link.
        self._stretch_cycles = 0
        self._link_free = torch.cuda.Event() if self._cuda else None
        self.copy_busy_ms = 0.0

    # -- called by the engine (model thread) ---------------------------------------------------------

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
        """Make ``experts`` of ``layer`` resident and pinned; return their slots in the same order.

        Hits are counted, misses loaded (evicting with the policy, never a pinned slot). On CUDA the
        compute stream is made to wait for the copies; the host does not block. At most ``num_slots``
        experts at a time; call ``release`` with the returned slots after queueing the compute.
        """
        assert len(experts) <= self.num_slots, "the engine chunks layers wider than the pool"
        with self._lock:
            stats = self._stats[layer]
            keys = [(layer, e) for e in experts]
            self._pinned.update(keys)
            slots, stall = [], False  # stall: some copy may still be running; time the wait
            for key in keys:
                stats.accesses += 1
                slot = self._slot_of.get(key)
                if slot is None:
                    self._count_miss(stats, key)
                    slot = self._load(key)
                    stall = True
                    self.policy.insert(key)
                else:
                    stats.hits += 1
                    self.policy.lookup(key)
                    if self._prefetched.pop(key, None) is not None:
                        stats.prefetch_hits += 1
                        if self._cuda and slot in self._unwaited and not self._ready[slot].query():
                            stats.late_prefetches += 1
                            stall = True
                self._state[slot] = SlotState.IN_USE
                slots.append(slot)
            if self._cuda:
                self._wait_ready(layer, slots, timed=stall)
            return slots

    def release(self, slots: Sequence[int]) -> None:
        """Unpin ``slots`` once the compute reading them is queued (records their last-use events)."""
        with self._lock:
            # Recorded on the stream the model runs on now; reads of the slot still queued on another
            # stream (overlapping generates on two streams, with no sync between) are not covered.
            compute = torch.cuda.current_stream(self.device) if self._cuda else None
            for slot in slots:
                assert self._state[slot] is SlotState.IN_USE
                self._state[slot] = SlotState.READY
                self._pinned.discard(self._key_of[slot])
                if self._cuda:
                    self._last_use[slot].record(compute)

    def emulate_link(self, stretch_cycles: int) -> None:
        """Stretch every later copy by ``stretch_cycles`` GPU clock cycles (``specmd.linkemu``), and
        serialize copies: an emulated link carries one copy at a time. 0 turns emulation off."""
        if stretch_cycles and not self._cuda:
            raise ValueError("link emulation needs CUDA (it sleeps on the copy streams)")
        with self._lock:
            self._stretch_cycles = int(stretch_cycles)

    def start_prefetches(self, requests: list[tuple[int, int, Key]]) -> list[tuple[int, int, Key]]:
        """Model thread, once per layer, nearest layer first: settle each ``(distance, target, key)`` request
        whose key is resident as ``prefetch`` would (notify the policy, extend a pending prefetch's
        protection); on CUDA, issue those that fit under ``max_inflight_prefetches`` now; return the rest,
        in order, for the watchdog. An asynchronous copy costs this thread a few CUDA calls, while waking
        the watchdog costs GIL handoffs during the layer's kernel launches (on the H100 at a 25% budget
        the thread cost 5 ms per token even when it copied nothing). On a CPU a copy would block this
        thread: every copy goes to the watchdog."""
        with self._lock:
            room = 0
            if self._cuda:
                bound = self._prefetch_room()
                room = len(requests) if bound is None else bound
            rest = []
            for request in sorted(requests, key=lambda r: r[0]):
                _, target, key = request
                if key in self._slot_of:
                    if target > self.position:
                        self._predicted_resident(key, target)
                elif room > 0 and not rest:  # once one request waits, the later ones wait behind it
                    room -= self.prefetch(key, target)
                else:
                    rest.append(request)
            return rest

    # -- called by the watchdog thread ---------------------------------------------------------------

    def prefetch_if_room(self, key: Key, target: int) -> bool | None:
        """``prefetch``, unless ``max_inflight_prefetches`` copies may still run: then None (the watchdog
        queues the request again). Checked under the lock: the model's thread issues prefetches too."""
        with self._lock:
            room = self._prefetch_room() if self._cuda else None
            if room is not None and room <= 0:
                return None
            return self.prefetch(key, target)

    def wait_for_prefetch_room(self) -> int | None:
        """Block the calling (watchdog) thread until fewer than ``max_inflight_prefetches`` prefetch copies
        may still be running; return how many more may start now (None: no bound). Never called by the
        model's thread."""
        if not self._cuda or self.max_inflight_prefetches is None:
            return None
        while True:
            with self._lock:
                room = self._prefetch_room()
                if room > 0:
                    return room
                oldest = self._inflight[0]
            oldest.synchronize()  # outside the lock: the model's thread keeps acquiring meanwhile

    def prefetch(self, key: Key, target: int) -> bool:
        """Load ``key`` ahead of its layer (absolute position ``target``) unless resident, stale, or no
        slot can be freed without evicting a pinned key or another pending prefetch. True if copied."""
        with self._lock:
            if target <= self.position:
                return False  # its layer already ran or is running: the demand path owns it now
            if key in self._slot_of:
                self._predicted_resident(key, target)
                return False
            if self._load(key, demand=False) is None:
                return False  # every slot is pinned or holds a pending prefetch
            self.policy.insert(key)
            self._prefetched[key] = target
            stats = self._stats[key[0]]
            stats.prefetches += 1
            stats.prefetch_bytes += self.layout.expert_bytes
            return True

    # -- either thread --------------------------------------------------------------------------------

    def resident(self) -> dict[Key, int]:
        """A copy of the (layer, expert) -> slot table."""
        with self._lock:
            return dict(self._slot_of)

    @property
    def occupied_bytes(self) -> int:
        return len(self._slot_of) * self.layout.expert_bytes

    def drain_timings(self, block: bool = True) -> None:
        """Add finished copy and stall timings to the counters; ``block`` synchronizes the device first."""
        if not self._cuda:
            return
        with self._lock:
            if block:
                torch.cuda.synchronize(self.device)
            # A prefetch's end event also bounds the copies in flight: reuse it only once it left that list.
            self._prune_inflight()
            inflight = {id(event) for event in self._inflight}
            keep_copies, keep_stalls = [], []
            for start, end in self._copy_timings:
                if block or end.query():
                    self.copy_busy_ms += start.elapsed_time(end)
                    if id(end) not in inflight:
                        self._spare_timings.append((start, end))
                else:
                    keep_copies.append((start, end))
            for layer, start, end in self._stall_timings:
                if block or end.query():
                    self._stats[layer].stall_ms += start.elapsed_time(end)
                    self._spare_timings.append((start, end))
                else:
                    keep_stalls.append((layer, start, end))
            self._copy_timings, self._stall_timings = keep_copies, keep_stalls

    def reset_timings(self) -> None:
        """Forget timings (changes state); counters are reset by their owner."""
        self.drain_timings()
        self.copy_busy_ms = 0.0

    def close(self) -> None:
        """Wait for queued copies, then drop the pool (changes state; the cache is unusable after)."""
        with self._lock:
            if self._cuda:
                torch.cuda.synchronize(self.device)  # both copy streams and whichever streams read the pool
            self.pool = torch.empty(0, device=self.device)
            self.views = {}
            self._slot_of.clear()

    # -- private (lock held) ------------------------------------------------------------------------------

    def _count_miss(self, stats: LayerStats, key: Key) -> None:
        if key not in self._ever_loaded:
            stats.misses_cold += 1
        elif key in self._evicted_this_pass:
            stats.misses_collision += 1
        else:
            stats.misses_capacity += 1

    def _predicted_resident(self, key: Key, target: int) -> None:
        """A prediction for a key already resident: tell the policy; a pending prefetch stays protected
        until the later of its targets."""
        self.policy.touch(key)
        if key in self._prefetched:
            self._prefetched[key] = max(self._prefetched[key], target)

    def _prune_inflight(self) -> None:
        while self._inflight and self._inflight[0].query():
            self._inflight.popleft()

    def _prefetch_room(self) -> int | None:
        """How many more prefetch copies may start now (None: no bound). CUDA only."""
        if self.max_inflight_prefetches is None:
            return None
        self._prune_inflight()
        return self.max_inflight_prefetches - len(self._inflight)

    def _wait_ready(self, layer: int, slots: list[int], timed: bool) -> None:
        # The stream the model runs on now: a generate under another stream context has waited on
        # nothing yet, so every resident slot counts as unwaited for it.
        compute = torch.cuda.current_stream(self.device)
        if compute != self._compute_stream:
            self._compute_stream = compute
            self._unwaited = set(self._slot_of.values())
        waits = [s for s in slots if s in self._unwaited]
        if not waits:
            return
        start = end = None
        if timed:
            start, end = self._timing_pair()
            start.record(compute)
        for slot in waits:
            compute.wait_event(self._ready[slot])
            self._unwaited.discard(slot)
        if timed:
            end.record(compute)
            self._stall_timings.append((layer, start, end))
            if len(self._stall_timings) > _MAX_PENDING_TIMINGS:
                self.drain_timings(block=False)

    def _timing_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if self._spare_timings:
            return self._spare_timings.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _take_slot(self, demand: bool) -> int | None:
        if self._free:
            return self._free.pop()
        protected = {k for k, t in self._prefetched.items() if t > self.position}
        victim = self.policy.select_victim(exclude=self._pinned | protected)
        if victim is None and demand:  # only pending prefetches are left: a demand load may take one
            victim = self.policy.select_victim(exclude=self._pinned)
        if victim is None:
            assert not demand, "acquire never pins more keys than there are slots"
            return None
        slot = self._slot_of.pop(victim)
        assert self._state[slot] is SlotState.READY, "a pinned slot is never evicted"
        self._key_of[slot] = None
        self._state[slot] = SlotState.FREE
        self.policy.remove(victim)
        self._evicted_this_pass.add(victim)
        stats = self._stats[victim[0]]
        stats.evictions += 1
        if self._prefetched.pop(victim, None) is not None:
            stats.wasted_prefetch_bytes += self.layout.expert_bytes
        return slot

    def _load(self, key: Key, demand: bool = True) -> int | None:
        """Copy ``key`` into a free or evicted slot; a prefetch (``demand=False``) gets None when no slot
        can be taken without evicting a pinned key or a pending prefetch."""
        slot = self._take_slot(demand)
        if slot is None:
            return None
        source = self._store.block(*key)
        if self._cuda:
            stream = self._demand_stream if demand else self._prefetch_stream
            with torch.cuda.stream(stream):
                start, end = self._timing_pair()
                # Readers of the previous occupant were queued before last_use: wait for them; and for
                # the previous copy into the slot (never read) when it ran on the other stream.
                stream.wait_event(self._last_use[slot])
                if self._copied_on[slot] is not stream:
                    stream.wait_event(self._ready[slot])
                    self._copied_on[slot] = stream
                if self._stretch_cycles:
                    stream.wait_event(self._link_free)
                start.record(stream)
                self.pool[slot].copy_(source, non_blocking=True)
                if self._stretch_cycles:
                    torch.cuda._sleep(self._stretch_cycles)
                    self._link_free.record(stream)
                end.record(stream)
                self._ready[slot].record(stream)
            self._unwaited.add(slot)
            self._copy_timings.append((start, end))
            if not demand:
                self._prune_inflight()
                self._inflight.append(end)
                self.peak_inflight_prefetches = max(self.peak_inflight_prefetches, len(self._inflight))
            if len(self._copy_timings) > _MAX_PENDING_TIMINGS:
                self.drain_timings(block=False)
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
