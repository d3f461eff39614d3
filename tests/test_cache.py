"""The slot cache on its own, driven through a copier that copies nothing: slot states, the one prefetch
entry pair and its order, the in-flight bound, and random operation sequences against a trivial model."""
import random

import pytest

from specmd.runtime.cache import SlotCache, SlotState
from specmd.runtime.copier import Copier
from specmd.runtime.metrics import LayerStats
from specmd.runtime.policies import POLICIES, make_policy
from specmd.runtime.prefetch import PrefetchRequest as R

LAYERS, EXPERTS = 3, 8


class FakeCopier(Copier):
    """Records copies; ``bound`` prefetch copies may be in flight until ``finish`` is called."""

    def __init__(self, bound=None):
        self.copies = []  # (slot, key, demand)
        self.bound = bound
        self.inflight = 0
        self.waited = []  # slots the reader was ordered after

    def copy(self, slot, key, demand):
        self.copies.append((slot, key, demand))
        if not demand:
            self.inflight += 1

    def order_reads(self, layer, slots, timed):
        self.waited += list(slots)

    def room(self):
        return None if self.bound is None else self.bound - self.inflight

    def finish(self):
        self.inflight = 0


def make_cache(slots=4, policy="lru", copier=None):
    copier = copier or FakeCopier()
    stats = [LayerStats() for _ in range(LAYERS)]
    return SlotCache(copier, slots, 1, slots, make_policy(policy), stats), copier, stats


def test_slot_lifecycle():
    cache, copier, _ = make_cache()
    assert cache.states() == [SlotState.FREE] * 4
    cache.set_position(10, 1, LAYERS)
    assert cache.submit_prefetches([R(1, 11, (2, 5))]) == []
    assert cache.states()[0] is SlotState.LOADING  # copy queued, no reader ordered after it yet
    cache.set_position(11, 2, LAYERS)
    slots = cache.acquire(2, [5, 6])
    assert slots == [0, 1] and cache.states()[:2] == [SlotState.IN_USE] * 2
    assert copier.waited == [0, 1]  # the prefetched slot and the miss: both ordered before the read
    cache.release(slots)
    assert cache.states()[:2] == [SlotState.READY] * 2
    cache.acquire(2, [5])
    assert copier.waited == [0, 1]  # READY: no second wait


def test_in_use_slots_are_never_evicted_and_chunks_reuse_slots():
    cache, copier, stats = make_cache(slots=2)
    slots = cache.acquire(0, [1, 2])
    with pytest.raises(AssertionError):
        cache.acquire(0, [3, 4, 5])  # wider than the pool: the main loop chunks it
    cache.release(slots)
    assert cache.acquire(0, [3]) in ([0], [1])
    assert stats[0].evictions == 1 and stats[0].misses_collision == 0


def test_prefetches_settle_in_one_order_and_the_rest_waits():
    """Nearest layer first; resident keys never reach the caller's queue; stale requests are dropped;
    once the bound is reached the rest comes back, in order, for the watchdog."""
    cache, copier, _ = make_cache(slots=6, copier=FakeCopier(bound=1))
    cache.release(cache.acquire(1, [0, 3]))
    cache.set_position(10, 0, LAYERS)
    requests = [R(2, 12, (2, 5)), R(1, 11, (1, 0)), R(1, 11, (1, 4)), R(1, 11, (1, 3)), R(1, 11, (1, 6)),
                R(1, 9, (1, 7))]
    rest = cache.submit_prefetches(requests)
    assert [c[1] for c in copier.copies if not c[2]] == [(1, 4)]
    assert rest == [R(1, 11, (1, 6)), R(2, 12, (2, 5))]
    assert cache.submit_prefetches(requests, copy=False) == [R(1, 11, (1, 6)), R(2, 12, (2, 5))]
    copier.finish()
    assert cache.wait_prefetch_room() == 1
    assert cache.submit_prefetches(rest) == [R(2, 12, (2, 5))]


def test_a_pending_prefetch_is_protected_from_other_prefetches_until_its_layer_ran():
    cache, copier, stats = make_cache(slots=1)
    cache.set_position(10, 0, LAYERS)
    assert cache.submit_prefetches([R(1, 11, (1, 2))]) == []
    cache.submit_prefetches([R(2, 12, (2, 3))])  # no slot without evicting the pending prefetch: dropped
    assert cache.resident() == {(1, 2): 0}
    cache.set_position(12, 2, LAYERS)  # layer 1 ran without using it: no longer protected
    cache.submit_prefetches([R(1, 13, (0, 3))])
    assert cache.resident() == {(0, 3): 0} and stats[1].wasted_prefetch_bytes == 1


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_against_a_dict(policy, seed):
    """Each key in at most one slot, the budget never exceeded, no IN_USE slot overwritten, and the
    counters equal a trivial model's."""
    rng = random.Random(seed)
    cache, copier, stats = make_cache(slots=5, policy=policy)
    resident = {}  # key -> slot, from the copies alone
    position = seen = 0
    for step in range(300):
        layer = step % LAYERS
        position += 1
        cache.set_position(position, layer, LAYERS)
        if rng.random() < 0.4:
            cache.submit_prefetches([R(1, position + 1, ((layer + 1) % LAYERS, rng.randrange(EXPERTS)))])
        experts = sorted(rng.sample(range(EXPERTS), rng.randint(1, 5)))
        slots = cache.acquire(layer, experts)
        for slot, key, _ in copier.copies[seen:]:
            resident = {k: s for k, s in resident.items() if s != slot}
            resident[key] = slot
        seen = len(copier.copies)
        table = cache.resident()
        assert table == resident and len(set(table.values())) == len(table) <= 5
        assert all(table[(layer, e)] == s for e, s in zip(experts, slots))
        assert all(cache.states()[s] is SlotState.IN_USE for s in slots)
        cache.release(slots)
    accesses = sum(s.accesses for s in stats)
    assert accesses == sum(s.hits + s.misses for s in stats)
    assert sum(s.bytes_copied for s in stats) == len(copier.copies)
