"""The cache decided on the device evicts exactly what the Python cache evicts: both are driven through the
same recorded traces (the shared Granite trace and the OLMoE-topology trace), with the main loop's chunks,
and every per-layer counter must agree."""
import os
from pathlib import Path

import pytest
import torch

from specmd.runtime.device_cache import COUNTERS, DeviceCache
from specmd.runtime.device_policies import DEVICE_POLICIES
from specmd.runtime.engines.mainloop import MainLoop
from specmd.study.sim import simulate
from specmd.study.trace import load_trace

ROOT = Path(__file__).resolve().parent.parent
SHARED_TRACE = ROOT.parent / "shared" / "traces" / "granite-3.0-1b-a400m.json"
OLMOE_TRACE = ROOT / "benchmarks" / "traces" / "trace-olmoe16x64-stdlib.json"


def drive(trace, capacity: int, eviction: str) -> DeviceCache:
    """The trace through a DeviceCache, by the main loop that runs the engines and the simulator."""
    cache = DeviceCache(trace.num_layers, trace.num_experts, capacity, eviction, torch.device("cpu"))
    loop = MainLoop(cache, trace.num_layers, submit=lambda requests: None)

    def check(chunk, slots):
        assert all(slot >= 0 for slot in slots) and len(set(slots)) == len(slots)
        assert cache.slots(layer)[chunk].tolist() == slots

    for layers in trace.accesses():
        for layer, experts in enumerate(layers):
            position, _ = loop.enter(layer)
            loop.start(layer, position)
            loop.run(layer, experts, [], check)
    return cache


def compare(trace, capacity, eviction):
    want = simulate(trace, capacity, eviction)
    got = drive(trace, capacity, eviction).stats(expert_bytes=1)
    for layer, (a, b) in enumerate(zip(got, want.layers)):
        fields = [c for c in COUNTERS if c != "wasted_prefetches"] + ["wasted_prefetch_bytes"]
        assert [getattr(a, c) for c in fields] == [getattr(b, c) for c in fields], (eviction, capacity, layer)
    assert sum(s.hits for s in got) == want.total.hits


@pytest.fixture(scope="module")
def olmoe_trace():
    return load_trace(OLMOE_TRACE)


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="the shared Granite trace is not on this machine")
@pytest.mark.parametrize("eviction", sorted(DEVICE_POLICIES))
@pytest.mark.parametrize("percent", [5, 25])
def test_device_policies_equal_the_python_policies_on_the_granite_trace(eviction, percent):
    trace = load_trace(SHARED_TRACE)
    compare(trace, trace.num_layers * trace.num_experts * percent // 100, eviction)


@pytest.mark.parametrize("eviction", sorted(DEVICE_POLICIES))
@pytest.mark.parametrize("percent", [5, 20])
def test_device_policies_equal_the_python_policies_on_the_olmoe_trace(eviction, percent, olmoe_trace):
    trace = olmoe_trace
    compare(trace, trace.num_layers * trace.num_experts * percent // 100, eviction)


def test_one_slot_and_the_resident_table(olmoe_trace):
    trace = olmoe_trace
    trace = type(trace)(trace.num_layers, trace.num_experts, trace.top_k, trace.passes[:3], "first passes")
    compare(trace, 1, "lru")
    cache = drive(trace, 3, "fifo")
    needed = torch.zeros(trace.num_experts, dtype=torch.bool)
    needed[[0, 1, 2]] = True
    misses = cache.access(0, needed)
    assert int(misses.count) == int(misses.valid.sum())
    valid = misses.valid
    assert torch.equal(cache.slots(0)[misses.experts[valid]], misses.slots[valid])  # each miss where it was copied
    resident = cache.resident()
    assert len(resident) == 3 and all(cache.slots(layer)[expert] == slot for (layer, expert), slot in resident.items())


def test_an_unknown_device_policy_is_refused():
    with pytest.raises(ValueError, match="least-stale"):
        DeviceCache(2, 8, 4, "random", torch.device("cpu"))


def _kernel_runs(device: str) -> str | None:
    """Why the cache kernel cannot run here (None: it can): CUDA with triton, or the CPU under Triton's
    interpreter (TRITON_INTERPRET=1)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "no triton on this machine"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1"
    return None


@pytest.mark.parametrize("eviction", sorted(DEVICE_POLICIES))
@pytest.mark.parametrize("percent,tile,prefetch", [(5, None, False), (20, 64, False), (100, None, False),
                                                   (5, None, True), (20, None, True)])
def test_the_cache_kernel_equals_the_torch_cache(eviction, percent, tile, prefetch, olmoe_trace, device,
                                                monkeypatch):
    """kernels/cache_access.py against DeviceCache.access, call by call, on the OLMoE-topology trace: the same
    misses in the same slots, and the same state after (tile=64 makes the victim search take several tiles).
    With prefetch, each demand call is followed by a prefetch call of the trace's recorded top-k prediction
    for the next layer, which must not evict the demand call's experts."""
    reason = _kernel_runs(device)
    if reason:
        pytest.skip(reason)
    from specmd.runtime.kernels import kernel

    if tile:
        monkeypatch.setattr(kernel("cache_access"), "TILE", tile)
    trace, dev = olmoe_trace, torch.device(device)
    L, E = trace.num_layers, trace.num_experts
    capacity = L * E * percent // 100
    passes = trace.passes if device == "cuda" else trace.passes[:12]  # the interpreter is slow
    torch_cache, kernel_cache = (DeviceCache(L, E, capacity, eviction, dev) for _ in range(2))
    calls = 0
    for index, layers in enumerate(passes):
        first = True  # a pass starts with its first call on the device
        for layer, ids in enumerate(layers):
            routed = torch.tensor(ids, device=dev)
            needed = torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, routed, True)
            if int(needed.sum()) > capacity:
                continue  # the main loop chunks these: not a device step
            if first:
                torch_cache.begin_pass()
            want = torch_cache.access(layer, needed, width=routed.numel())
            got = kernel_cache.access_ids(layer, routed, begin=first)
            first = False
            count = int(want.count)
            assert int(got.count) == count, (index, layer)
            assert got.experts[:count].tolist() == want.experts[:count].tolist(), (index, layer)
            assert got.slots[:count].tolist() == want.slots[:count].tolist(), (index, layer)
            assert torch.equal(got.layer_slots, want.layer_slots), (index, layer)
            calls += 1
            if prefetch and layer + 1 < L:
                predicted = torch.tensor(trace.candidates(index, layer, 1, trace.top_k)[0], device=dev)
                guess = torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, predicted, True)
                want_p = torch_cache.access(layer + 1, guess, width=predicted.numel(), protect=(layer, needed))
                got_p = kernel_cache.access_ids(layer + 1, predicted, protect_layer=layer)
                count = int(want_p.count)
                assert int(got_p.count) == count and count <= int(guess.sum()), (index, layer)
                assert got_p.slots[:count].tolist() == want_p.slots[:count].tolist(), (index, layer)
                assert torch.equal(torch_cache.slots(layer)[needed], want.layer_slots[needed])  # kept
    assert calls > len(passes)
    S = capacity  # the spare entries past the end take masked writes and differ; the rest must not
    real = {"table": (slice(None), slice(0, E)), "owner": slice(0, S), "ever_loaded": slice(0, L * E),
            "evicted_this_pass": slice(0, L * E), "counters": (slice(None), slice(0, L)), "fresh": slice(0, S)}
    for name in ("table", "owner", "ever_loaded", "evicted_this_pass", "clock", "counters", "passes", "fresh"):
        a, b = getattr(torch_cache, name), getattr(kernel_cache, name)
        assert torch.equal(a[real.get(name, ...)], b[real.get(name, ...)]), name
    assert (int(torch_cache.counters[COUNTERS.index("prefetches")].sum()) > 0) == prefetch
    # prefetch outcomes are counted (and equal, above): some prefetched experts are used, some wasted
    assert (int(torch_cache.counters[COUNTERS.index("prefetch_hits")].sum()) > 0) == prefetch
    for a, b in zip(torch_cache.policy.kernel_state(), kernel_cache.policy.kernel_state()):
        assert torch.equal(a[:S] if a.dim() else a, b[:S] if b.dim() else b)


@pytest.mark.parametrize("eviction", ["lru", "least-stale"])
def test_a_prefetch_wider_than_the_free_slots_is_cut_to_them(eviction, device):
    """Three slots, two of them held by the demand call: of six predicted experts one is copied, the rest are
    dropped, the demand call's experts stay; the kernel (where it runs) writes no more than its buffers hold
    and decides the same."""
    import random

    rng = random.Random(1)
    L, E, dev = 3, 8, torch.device(device)
    caches = [DeviceCache(L, E, 3, eviction, dev)]
    if _kernel_runs(device) is None:
        caches.append(DeviceCache(L, E, 3, eviction, dev))
    for step in range(10):
        for layer in range(L):
            ids = torch.tensor(rng.sample(range(E), 2), device=dev)
            predicted = torch.tensor(rng.sample(range(E), 6), device=dev) if layer + 1 < L else None
            needed = torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, ids, True)
            if layer == 0:
                caches[0].begin_pass()
            slots = caches[0].access(layer, needed, width=2).layer_slots.clone()  # a view of the table
            found = []
            if predicted is not None:
                guess = torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, predicted, True)
                copies = caches[0].access(layer + 1, guess, width=6, protect=(layer, needed))
                found.append(copies.slots[:int(copies.count)].tolist())
                assert int(copies.count) <= 1 + int((caches[0].slots(layer + 1)[guess] >= 0).sum())
                assert torch.equal(caches[0].slots(layer)[needed], slots[needed])  # the demand call's experts stay
            if len(caches) == 2:
                got = caches[1].access_ids(layer, ids, begin=layer == 0)
                assert torch.equal(got.layer_slots, slots)
                if predicted is not None:
                    copies = caches[1].access_ids(layer + 1, predicted, protect_layer=layer)
                    assert copies.slots[:int(copies.count)].tolist() == found[0]
    assert int(caches[0].counters[COUNTERS.index("prefetches")].sum()) > 0
    if len(caches) == 2:
        assert torch.equal(caches[0].counters[:, :L], caches[1].counters[:, :L])


@pytest.mark.parametrize("eviction", sorted(DEVICE_POLICIES))
def test_the_cache_step_op_equals_the_torch_step(eviction, device):
    """``specmd::cache_step`` (the access kernel, the gather, and the prefetch calls: on CUDA forked onto the
    side stream) against ``DeviceCache.step``'s torch calls, with lookahead 2 and dropped candidates (-1):
    the same state after every layer, and every slot holding the expert its owner says."""
    reason = _kernel_runs(device)
    if reason:
        pytest.skip(reason)
    from specmd.runtime.gather import _SideStream, cache_step

    L, E, S, W, dev = 4, 8, 6, 4, torch.device(device)
    g = torch.Generator().manual_seed(0)
    stores = [(torch.arange(E * W, dtype=torch.int32).view(E, W) + 1000 * (layer + 1)).to(dev) for layer in range(L)]
    want, got = DeviceCache(L, E, S, eviction, dev), DeviceCache(L, E, S, eviction, dev)
    pool = torch.zeros(S, W, dtype=torch.int32, device=dev)
    for step in range(30 if device == "cuda" else 8):
        for layer in range(L):
            ids = torch.randint(0, E, (2,), generator=g).to(dev)
            targets = [t for t in (layer + 1, layer + 2) if t < L]
            predicted = None
            if targets:
                predicted = torch.stack([torch.randperm(E, generator=g)[:4] for _ in targets]).to(dev)
                predicted[:, 3] = -1
            want.step(layer, ids, begin=layer == 0, predicted=predicted, targets=targets)
            dims = [L, E, S, got.policy.kernel_id]
            slots = cache_step(ids, layer, layer == 0, got.kernel_state(), got.found, stores[layer], pool, None, dims,
                               predicted, targets, got.kernel_state(prefetch=True), got.found_prefetch,
                               [stores[t] for t in targets], dev.type == "cuda", 2)  # prefetches: 2 programs
            if dev.type == "cuda":  # the checks read the state on this stream: join the prefetch calls first
                _SideStream.of(dev).join()
            assert torch.equal(slots[ids], want.table[layer, ids]), (step, layer)
            for name, a, b in [("table", want.table[:, :E], got.table[:, :E]), ("owner", want.owner[:S], got.owner[:S]),
                               ("counters", want.counters[:, :L], got.counters[:, :L]), ("clock", want.clock, got.clock),
                               ("loaded", want.ever_loaded[:-1], got.ever_loaded[:-1]),
                               ("fresh", want.fresh[:S], got.fresh[:S]),
                               ("last", want.policy.last[:S], got.policy.last[:S])]:
                assert torch.equal(a, b), (name, step, layer)
            for slot, key in enumerate(got.owner[:S].tolist()):
                if key >= 0:
                    assert torch.equal(pool[slot], stores[key // E][key % E]), (slot, key)
    assert int(got.counters[COUNTERS.index("prefetches")].sum()) > 0


@pytest.mark.parametrize("programs", [0, 1, 3])
def test_the_bounded_gather_copies_what_the_full_grid_copies(programs, device):
    """The miss gather on ``programs`` programs, each looping over pieces of the experts' blocks (what a
    prefetch runs on, beside the layer's compute), writes exactly the full grid's copies: the first ``count``
    experts into their slots, pieces past a block's end and entries past ``count`` untouched."""
    reason = _kernel_runs(device)
    if reason:
        pytest.skip(reason)
    from specmd.runtime.kernels import kernel

    gather = kernel("miss_gather")
    words = 2 * gather.WORDS_PER_PROGRAM + 5  # three pieces, the last one short
    dev = torch.device(device)
    store = torch.arange(6 * words, dtype=torch.int32, device=dev).view(6, words)
    pool = torch.full((4, words), -1, dtype=torch.int32, device=dev)
    experts = torch.tensor([5, 0, 3, 2], device=dev)
    slots = torch.tensor([2, 0, 3, 1], device=dev)
    gather.gather_misses(store, pool, experts, slots, torch.tensor([3], device=dev), programs)
    want = torch.full_like(pool, -1)
    want[[2, 0, 3]] = store[[5, 0, 3]]
    assert torch.equal(pool, want)


@pytest.mark.parametrize("version", ["torch", "kernel"])
def test_prefetch_hits_and_waste_by_hand(version, device):
    """Two layers of four experts, two slots, lru, worked by hand: a prefetched expert's first demand access
    is a prefetch hit (once); a prefetched expert evicted before any demand access is wasted, on its own
    layer's count; a demand call leaves its victims not fresh."""
    if version == "kernel" and (reason := _kernel_runs(device)):
        pytest.skip(reason)
    dev = torch.device(device)
    cache = DeviceCache(2, 4, 2, "lru", dev)

    def demand(layer, experts, begin=False):
        if version == "torch":
            if begin:
                cache.begin_pass()
            cache.access(layer, cache._mask(torch.tensor(experts, device=dev)))
        else:
            cache.access_ids(layer, torch.tensor(experts, device=dev), begin=begin)

    def prefetch(after_layer, after_experts, layer, experts):
        if version == "torch":
            cache.access(layer, cache._mask(torch.tensor(experts, device=dev)),
                         protect=(after_layer, cache._mask(torch.tensor(after_experts, device=dev))))
        else:
            cache.access_ids(layer, torch.tensor(experts, device=dev), protect_layer=after_layer)

    def count(name):
        return cache.counters[COUNTERS.index(name), :2].tolist()

    demand(0, [0], begin=True)  # slot 0 <- (0, 0)
    prefetch(0, [0], 1, [1])  # slot 1 <- (1, 1), fresh
    demand(1, [1])  # a prefetch hit
    demand(1, [1])  # not another
    assert count("prefetch_hits") == [0, 1] and count("wasted_prefetches") == [0, 0]
    prefetch(1, [1], 1, [2])  # slot 0's (0, 0) evicted (not fresh: no waste) <- (1, 2), fresh
    assert count("wasted_prefetches") == [0, 0] and cache.fresh[:2].tolist() == [True, False]
    demand(0, [0], begin=True)  # evicts lru slot 1's (1, 1): used, not fresh
    demand(1, [3])  # evicts slot 0's (1, 2), prefetched and never used: wasted, on layer 1
    assert count("prefetch_hits") == [0, 1] and count("wasted_prefetches") == [0, 1]
    assert cache.fresh[:2].tolist() == [False, False]  # demand copies are not fresh
    assert count("prefetches") == [0, 2]
