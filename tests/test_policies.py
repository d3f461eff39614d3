"""Eviction order of every policy on hand-written access sequences, victims computed by hand."""
import pytest

from specmd.runtime.policies import POLICIES, make_policy


def fill(policy, keys):
    for k in keys:
        policy.insert(k)


def test_lru_evicts_least_recently_used():
    p = make_policy("lru")
    fill(p, ["a", "b", "c"])
    p.lookup("a")  # order now b, c, a
    assert p.select_victim() == "b"
    assert p.select_victim(exclude={"b"}) == "c"
    p.remove("b")
    p.lookup("c")  # a, c
    assert p.select_victim() == "a"


def test_fifo_ignores_accesses():
    p = make_policy("fifo")
    fill(p, ["a", "b", "c"])
    p.lookup("a")
    p.lookup("a")
    assert p.select_victim() == "a"
    assert p.select_victim(exclude={"a"}) == "b"


def test_lfu_evicts_least_frequent_then_least_recent():
    p = make_policy("lfu")
    fill(p, ["a", "b", "c"])  # counts 1, 1, 1
    p.lookup("a")
    p.lookup("a")  # a: 3
    p.lookup("b")  # b: 2
    assert p.select_victim() == "c"
    p.lookup("c")  # c: 2, more recent than b
    assert p.select_victim() == "b"
    p.remove("b")
    p.insert("b")  # counts survive eviction: b is back at 3, c (2) goes first
    assert p.select_victim() == "c"


def test_random_is_seeded_and_respects_exclude():
    draws = []
    for _ in range(2):
        p = make_policy("random", seed=7)
        fill(p, list(range(10)))
        draws.append([p.select_victim() for _ in range(5)])
    assert draws[0] == draws[1]
    p = make_policy("random", seed=7)
    fill(p, [1, 2, 3])
    assert all(p.select_victim(exclude={1, 2}) == 3 for _ in range(10))


def test_layer_distance_evicts_furthest_layer_cyclically():
    p = make_policy("layer-distance")
    fill(p, [(0, 0), (1, 0), (2, 0), (3, 0)])
    p.set_layer(2, 4)  # distances: layer 2 -> 0, 3 -> 1, 0 -> 2, 1 -> 3
    assert p.select_victim() == (1, 0)
    assert p.select_victim(exclude={(1, 0)}) == (0, 0)
    p.set_layer(0, 4)  # layer 3 just ran: furthest
    assert p.select_victim() == (3, 0)
    p.insert((3, 1))
    p.lookup((3, 0))  # same layer: least recently used first -> (3, 1)
    assert p.select_victim() == (3, 1)


def test_layer_lru_counts_recency_in_passes_then_evicts_the_layer_needed_last():
    p = make_policy("layer-lru")
    p.begin_pass()  # pass 1: layers 0..3 run in order
    for layer in range(4):
        p.set_layer(layer, 4)
        p.insert((layer, 0))
    pass_one = [(layer, 0) for layer in range(4)]
    p.begin_pass()  # pass 2
    p.set_layer(0, 4)
    p.insert((0, 1))  # layer 0 runs again, with another expert
    # the pass-1 keys are equally old; the furthest layer ahead of layer 0 is layer 3 (it just ran), where LRU
    # takes (0, 0), the least recent:
    assert p.select_victim() == (3, 0)
    assert make_lru_victim(pass_one + [(0, 1)]) == (0, 0)
    p.set_layer(1, 4)
    p.lookup((1, 0))
    # left from pass 1: (0, 0) three layers ahead of layer 1, (3, 0) two, (2, 0) one
    assert p.select_victim() == (0, 0)
    assert p.select_victim(exclude={(0, 0)}) == (3, 0)  # LRU takes (2, 0), the one the next layer needs
    assert make_lru_victim(pass_one, exclude={(0, 0), (1, 0)}) == (2, 0)
    p.lookup((2, 0))  # used in this pass: newer than every pass-1 key, whatever its layer
    assert p.select_victim(exclude={(0, 0)}) == (3, 0)
    assert p.select_victim(exclude={(0, 0), (3, 0)}) == (0, 1)  # pass 2 keys: (0, 1) is furthest ahead


def make_lru_victim(keys, exclude=()):
    lru = make_policy("lru")
    fill(lru, keys)
    return lru.select_victim(exclude=set(exclude))


def test_predicted_keeps_what_a_live_prediction_wants_until_its_layer_runs():
    p = make_policy("predicted")
    fill(p, [(0, 0), (1, 0), (2, 0), (3, 0)])
    p.set_layer(0, 4)  # furthest ahead of layer 0: layer 3 (it just ran), then 2, 1
    assert p.select_victim() == (3, 0)
    p.touch((3, 0))  # the prefetch loop predicted it (for the next pass's layer 3)
    p.touch((0, 0))
    assert p.select_victim() == (2, 0)  # no prediction wants it
    assert p.select_victim(exclude={(2, 0), (1, 0)}) == (3, 0)  # only wanted keys left: furthest first
    p.set_layer(3, 4)  # layer 3 runs: its prediction is settled, the demand decides from now on
    assert p.select_victim(exclude={(2, 0), (1, 0)}) == (3, 0)  # (0, 0) is still wanted
    p.set_layer(0, 4)
    assert p.select_victim(exclude={(2, 0), (1, 0)}) == (3, 0)  # no prediction left; layer 3 is furthest


def test_least_stale_evicts_stale_first_then_oldest_first_touch():
    p = make_policy("least-stale")
    p.begin_pass()  # pass 1
    fill(p, ["a", "b", "c"])
    p.begin_pass()  # pass 2: a, b, c stale
    p.lookup("b")  # b current
    p.insert("d")  # d current, touched after b
    # stale first, oldest first touch: a (touched before c)
    assert p.select_victim() == "a"
    assert p.select_victim(exclude={"a"}) == "c"
    # only current ones left: b first touched before d in this pass
    assert p.select_victim(exclude={"a", "c"}) == "b"
    p.lookup("b")  # a second touch in the same pass keeps b's first-touch time
    assert p.select_victim(exclude={"a", "c"}) == "b"
    p.touch("a")  # a prefetch makes a current, touched last
    assert p.select_victim() == "c"
    assert p.select_victim(exclude={"c"}) == "b"


def test_least_stale_differs_from_lru_on_cyclic_layers():
    # Layers 0..2 cycle; the cache has room for 2 of 3. LRU evicts the expert needed next;
    # Least-Stale keeps the current pass's experts and evicts by pass age.
    p = make_policy("least-stale")
    p.begin_pass()
    fill(p, ["L0", "L1"])
    p.begin_pass()
    p.lookup("L0")
    assert p.select_victim() == "L1"  # stale


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_none_when_all_excluded(name):
    p = make_policy(name)
    fill(p, [(0, 1), (0, 2)])
    assert p.select_victim(exclude={(0, 1), (0, 2)}) is None
    p.remove((0, 1))
    assert p.select_victim() == (0, 2)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="least-stale") as err:
        make_policy("mru")
    assert "lru" in str(err.value)


def test_belady_evicts_the_furthest_next_access():
    from specmd.runtime.policies import Belady

    future = {"a": [5, 9], "b": [3], "c": [7], "d": []}

    def next_access(key, now):
        return next((t for t in future[key] if t >= now), float("inf"))

    p = Belady(next_access)
    fill(p, ["a", "b", "c", "d"])
    p.set_now(2)
    assert p.select_victim() == "d"  # never again
    assert p.select_victim(exclude={"d"}) == "c"  # 7 > 5 > 3
    p.set_now(6)
    assert p.select_victim(exclude={"d"}) == "b"  # b never again after 3
    assert p.select_victim(exclude={"b", "d"}) == "a"  # a at 9, c at 7
