"""Eviction policies: plain Python, no torch, shared by the live cache and the simulator.

A policy tracks resident keys (any hashable; the engine uses ``(layer, expert)``) and answers one
question: which resident key to evict. It never touches slots; the cache owns those.
"""
from __future__ import annotations

import random as _random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Hashable

Key = Hashable


class EvictionPolicy(ABC):
    """Interface every eviction policy implements.

    Hooks that change state say so. ``begin_pass`` and ``set_layer`` are notifications from the
    engine (a new forward pass starts; MoE layer ``layer`` of ``num_layers`` is executing);
    policies that do not care ignore them.
    """

    name: str = ""

    def begin_pass(self) -> None:
        """A new forward pass starts (changes state for pass-aware policies)."""

    def set_layer(self, layer: int, num_layers: int) -> None:
        """MoE layer ``layer`` of ``num_layers`` is executing (changes state for position-aware policies)."""

    @abstractmethod
    def insert(self, key: Key) -> None:
        """Record that ``key`` became resident (changes state)."""

    @abstractmethod
    def lookup(self, key: Key) -> None:
        """Record an access to the resident ``key`` (changes state)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forget ``key``; it is no longer resident (changes state)."""

    @abstractmethod
    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        """Return the key to evict, never one in ``exclude``; None when every key is excluded.

        Does not change state: the caller calls ``remove`` once it has evicted the key.
        """

    def touch(self, key: Key) -> None:
        """Prefetch notification for a resident key (changes state only where a policy counts prefetches)."""


class _OrderedPolicy(EvictionPolicy):
    """Evicts the first key of an ordered dict that is not excluded; subclasses decide the order."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        for key in self._order:
            if key not in exclude:
                return key
        return None


class LRU(_OrderedPolicy):
    """Least recently used: every access moves the key to the back."""

    name = "lru"

    def lookup(self, key: Key) -> None:
        self._order.move_to_end(key)


class FIFO(_OrderedPolicy):
    """First in, first out: accesses do not change the order."""

    name = "fifo"

    def lookup(self, key: Key) -> None:
        pass


class LFU(EvictionPolicy):
    """Least frequently used, counting every access since the start (a key's count survives its eviction);
    ties go to the least recently used. (Matches the reference figures in shared/traces/README.md.)"""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}  # every key ever seen
        self._last: dict[Key, int] = {}  # resident keys -> time of last access
        self._clock = 0

    def _access(self, key: Key) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._clock

    insert = _access
    lookup = _access

    def remove(self, key: Key) -> None:
        self._last.pop(key, None)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        candidates = (k for k in self._last if k not in exclude)
        return min(candidates, key=lambda k: (self._count[k], self._last[k]), default=None)


class RandomPolicy(EvictionPolicy):
    """Uniformly random victim from a seeded generator, so a run is reproducible."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = _random.Random(seed)
        self._keys: dict[Key, None] = {}  # insertion-ordered: the draw depends only on the seed and history

    def insert(self, key: Key) -> None:
        self._keys[key] = None

    def lookup(self, key: Key) -> None:
        pass

    def remove(self, key: Key) -> None:
        self._keys.pop(key, None)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        candidates = [k for k in self._keys if k not in exclude]
        return self._rng.choice(candidates) if candidates else None


class LayerDistance(LRU):
    """Evict the expert whose layer runs furthest in the future, counting cyclically from the executing layer.

    Keys must be ``(layer, expert)``. The layer just executed is the furthest away (it runs again only in
    the next pass). Ties (same layer) go to the least recently used.
    """

    name = "layer-distance"

    def __init__(self) -> None:
        super().__init__()
        self._layer = 0
        self._num_layers = 1

    def set_layer(self, layer: int, num_layers: int) -> None:
        self._layer, self._num_layers = layer, num_layers

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        best, best_distance = None, -1
        for key in self._order:  # LRU order, so the first key at the largest distance wins ties
            if key in exclude:
                continue
            distance = (key[0] - self._layer) % self._num_layers
            if distance > best_distance:
                best, best_distance = key, distance
        return best


class LeastStale(EvictionPolicy):
    """Least-Stale (SpecMD, arXiv 2602.03921): evict experts not touched in the current pass first.

    A key touched (demand access, insertion or prefetch) in the current forward pass is *current*, every
    other key *stale*. Victims: stale before current; inside each group, oldest first by the time the key
    was first touched in its latest pass. ``begin_pass`` makes every current key stale.
    """

    name = "least-stale"

    def __init__(self) -> None:
        self._pass = 0
        self._clock = 0
        self._touched_pass: dict[Key, int] = {}
        self._first_touch: dict[Key, int] = {}

    def begin_pass(self) -> None:
        self._pass += 1

    def _touch(self, key: Key) -> None:
        self._clock += 1
        if self._touched_pass.get(key) != self._pass:
            self._touched_pass[key] = self._pass
            self._first_touch[key] = self._clock

    def insert(self, key: Key) -> None:
        self._touched_pass.pop(key, None)
        self._touch(key)

    lookup = _touch
    touch = _touch

    def remove(self, key: Key) -> None:
        self._touched_pass.pop(key, None)
        self._first_touch.pop(key, None)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        candidates = (k for k in self._touched_pass if k not in exclude)
        return min(
            candidates,
            key=lambda k: (self._touched_pass[k] == self._pass, self._first_touch[k]),
            default=None,
        )


class LayerLRU(LRU):
    """Layer-aware LRU, after Angelopoulos, Marchal, Obrecht and Simon, "Cache Management for Mixture-of-Experts
    LLMs" (2025), as we read its description (the paper's text was not reachable here): recency is counted
    in rounds (forward passes), not in accesses; among keys last used in the same (oldest) round, the one
    whose layer runs furthest ahead (cyclically from the executing layer) goes first, then LRU order. Plain
    LRU instead evicts a pass's earliest layers first, which the next pass needs soonest. Keys must be
    ``(layer, expert)``."""

    name = "layer-lru"

    def __init__(self) -> None:
        super().__init__()
        self._round = 0
        self._last_round: dict[Key, int] = {}
        self._layer = 0
        self._num_layers = 1

    def begin_pass(self) -> None:
        self._round += 1

    def set_layer(self, layer: int, num_layers: int) -> None:
        self._layer, self._num_layers = layer, num_layers

    def insert(self, key: Key) -> None:
        super().insert(key)
        self._last_round[key] = self._round

    def lookup(self, key: Key) -> None:
        super().lookup(key)
        self._last_round[key] = self._round

    def remove(self, key: Key) -> None:
        super().remove(key)
        self._last_round.pop(key, None)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        best, best_rank = None, None
        for key in self._order:  # LRU order: the first key of the best rank wins ties
            if key in exclude:
                continue
            rank = (self._last_round[key], -((key[0] - self._layer) % self._num_layers))
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        return best


class PredictionInformed(LayerDistance):
    """Evict what no live prediction and no nearer layer wants: keys a prediction named (``touch``, from the
    prefetch loop) are kept until their layer runs; among the others, the key whose layer runs furthest ahead
    goes first, then LRU order (``LayerDistance``). Predicted keys go last, the same way. With perfect
    predictions it approaches Belady (the simulator's ``belady``, its ceiling); without prefetch it is
    ``layer-distance``. Keys must be ``(layer, expert)``."""

    name = "predicted"

    def __init__(self) -> None:
        super().__init__()
        self._wanted: set[Key] = set()

    def set_layer(self, layer: int, num_layers: int) -> None:
        super().set_layer(layer, num_layers)
        self._wanted = {key for key in self._wanted if key[0] != layer}  # its layer runs: the demand decides

    def touch(self, key: Key) -> None:
        self._wanted.add(key)

    def remove(self, key: Key) -> None:
        super().remove(key)
        self._wanted.discard(key)

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        unwanted = super().select_victim(exclude=set(exclude) | self._wanted)
        return unwanted if unwanted is not None else super().select_victim(exclude)


class Belady(LRU):
    """The oracle (simulator only): evict the key whose next access is furthest in the future; keys never
    accessed again first; ties to the least recently used. ``next_access(key, now)`` answers from the trace;
    the simulator calls ``set_now`` before each layer."""

    name = "belady"

    def __init__(self, next_access) -> None:
        super().__init__()
        self._next_access = next_access
        self._now = 0

    def set_now(self, now: int) -> None:
        """The absolute position (pass * layers + layer) being executed (changes state)."""
        self._now = now

    def select_victim(self, exclude: Collection[Key] = ()) -> Key | None:
        best, best_next = None, -1
        for key in self._order:  # LRU order: the first key at the furthest next access wins ties
            if key in exclude:
                continue
            upcoming = self._next_access(key, self._now)
            if upcoming > best_next:
                best, best_next = key, upcoming
        return best


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRU, LFU, FIFO, RandomPolicy, LayerDistance, LeastStale, LayerLRU, PredictionInformed)
}


def make_policy(name: str, seed: int = 0) -> EvictionPolicy:
    """Build the eviction policy called ``name``; a ValueError lists the valid names."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    return cls(seed) if cls is RandomPolicy else cls()
