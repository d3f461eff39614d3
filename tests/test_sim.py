"""The simulator drives the live SlotCache and policies with a routing trace."""
from pathlib import Path

import pytest

from specmd.study.sim import SIM_POLICIES, simulate
from specmd.study.trace import RoutingTrace, load_trace

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "granite-3.0-1b-a400m.json"

# shared/traces/README.md: demand-only hit rate (%) / collision misses, capacity in experts of 768.
REFERENCE = {
    38: {"lru": (0.0, 3332), "lfu": (9.6, 950), "fifo": (0.0, 3332), "layer-distance": (6.1, 643),
         "least-stale": (0.0, 3332), "belady": (14.8, 448)},
    76: {"lru": (0.0, 6444), "lfu": (18.2, 1059), "fifo": (0.0, 6444), "layer-distance": (13.9, 558),
         "least-stale": (0.0, 6444), "belady": (30.0, 223)},
    192: {"lru": (39.6, 497), "lfu": (39.8, 1028), "fifo": (26.3, 4642), "layer-distance": (36.3, 395),
          "least-stale": (39.6, 497), "belady": (60.4, 34)},
    384: {"lru": (63.7, 2753), "lfu": (69.2, 565), "fifo": (59.4, 3200), "layer-distance": (66.8, 154),
          "least-stale": (63.7, 2753), "belady": (85.3, 0)},
}


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="the shared Granite trace is not on this machine")
@pytest.mark.parametrize("capacity", sorted(REFERENCE))
def test_granite_trace_matches_the_reference_figures(capacity):
    trace = load_trace(SHARED_TRACE)
    assert (trace.num_layers, trace.num_experts, trace.top_k, len(trace.passes)) == (24, 32, 8, 195)
    for policy, (hit_pct, collisions) in REFERENCE[capacity].items():
        stats = simulate(trace, capacity, policy)
        assert round(100 * stats.hit_rate, 1) == hit_pct, (capacity, policy)
        assert stats.total.misses_collision == collisions, (capacity, policy)


def cyclic_trace(passes=3):
    # 3 layers, 2 experts each per pass, always the same: a working set of 6
    return RoutingTrace(3, 4, 2, [[[0, 1], [2, 3], [1, 2]] for _ in range(passes)])


def test_hand_computed_lru_on_a_cyclic_trace():
    # capacity 4 < 6 per pass: LRU always evicts what the next layer needs, so only cold misses and then
    # nothing but misses; 6 cold, and every later access misses.
    stats = simulate(cyclic_trace(), 4, "lru")
    t = stats.total
    assert (t.accesses, t.hits, t.misses_cold) == (18, 0, 6)
    assert t.evictions == 18 - 4
    assert simulate(cyclic_trace(), 6, "lru").total.hits == 12  # everything fits after the first pass


def test_belady_beats_every_policy_and_counts_add_up():
    trace = cyclic_trace(5)
    oracle = simulate(trace, 4, "belady").total.hits
    for policy in SIM_POLICIES:
        t = simulate(trace, 4, policy).total
        assert t.accesses == t.hits + t.misses == 30
        assert t.hits <= oracle


def test_bad_simulator_input():
    with pytest.raises(ValueError, match="belady"):
        simulate(cyclic_trace(), 4, "clairvoyant")
    with pytest.raises(ValueError, match="at least one"):
        simulate(cyclic_trace(), 0, "lru")


def test_trace_reader_names_the_expected_keys(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"layers": []}')
    with pytest.raises(ValueError, match="num_layers"):
        load_trace(path)


def test_table_and_plot_writers(tmp_path):
    from specmd.bench.report import hit_rate_plot, markdown_table

    trace = cyclic_trace(4)
    rows = [{"budget": f"{b}%", "eviction": e, "prefetch": "none", **simulate(trace, c, e).to_dict()}
            for b, c in ((25, 3), (50, 6)) for e in ("lru", "belady")]
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| budget | lru | belady |" and len(lines) == 4
    assert lines[3].startswith("| 50% | 75.0% / 0 |")  # everything fits after the first pass
    png = tmp_path / "hit.png"
    hit_rate_plot(rows, png, title="cyclic")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
