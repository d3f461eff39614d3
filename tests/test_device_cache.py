"""The cache decided on the device evicts exactly what the Python cache evicts: both are driven through the
same recorded traces (the shared Granite trace and the OLMoE-topology trace), with the main loop's chunks,
and every per-layer counter must agree."""
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
        assert [getattr(a, c) for c in COUNTERS] == [getattr(b, c) for c in COUNTERS], (eviction, capacity, layer)
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
