"""The simulator's cost model: arithmetic, timeline, profiles."""
from pathlib import Path

import pytest

from specmd.study.costmodel import GraphLink, LinkProfile, ModelTiming, Timeline
from specmd.study.graph_sim import GraphTiming, simulate_graph
from specmd.study.sim import simulate
from specmd.study.trace import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
LINK = LinkProfile("test", link_gbps=10.0, copy_overhead_us=100.0)  # 1e7 bytes: 1 ms + 0.1 ms
MODEL = ModelTiming("test", expert_bytes=10_000_000, decode_layer_ms=2.0, prefill_ms_per_token=0.5)


def test_copy_and_layer_arithmetic():
    assert LINK.copy_ms(10_000_000) == pytest.approx(1.1)
    assert MODEL.layer_ms(1) == 2.0 and MODEL.layer_ms(5) == pytest.approx(4.0)


def test_timeline_serialises_copies_and_overlaps_compute():
    t = Timeline(LINK, MODEL)
    t.load((0, 0))
    t.load((0, 1))  # queued behind the first: ready at 2.2
    assert t.compute([(0, 0)], 2.0) == pytest.approx(1.1)  # waits for the first copy only
    assert t.now == pytest.approx(3.1)
    assert t.compute([(0, 1)], 1.0) == 0.0  # the second copy finished during the first compute
    t.load((1, 0))  # copy engine idle: starts now (4.1)
    assert t.compute([(1, 0)], 1.0) == pytest.approx(1.1)
    assert t.copy_busy_ms == pytest.approx(3.3)


def test_a_host_bound_layer_overlaps_its_copies():
    """A threaded profile with the engine's host time: a layer takes its host time from its start beside its
    copies, then its tail of compute once they are in: max(now + host, ready + tail); the stall is what the
    copies add to the longer of the two. Without host time, the old timeline."""
    link = LinkProfile("host", link_gbps=10.0, copy_overhead_us=0.0, model="test", host_layer_ms=3.0,
                       tail_layer_ms=0.5, prefill_token_ms=0.25)
    assert link.layer_ms(MODEL, 1) == (0.5, 3.0) and link.layer_ms(MODEL, 5) == (0.5 + 4 * 0.25, 3.0)
    assert LINK.layer_ms(MODEL, 5) == (MODEL.layer_ms(5), 0.0)
    t = Timeline(link, MODEL)
    t.load((0, 0))  # 1 ms: ready at 1
    assert t.compute([(0, 0)], 0.5, 3.0) == 0.0 and t.now == pytest.approx(3.0)  # the host is longer
    for e in range(4):
        t.load((1, e))  # 4 ms of copies from 3: ready at 7
    assert t.compute([(1, e) for e in range(4)], 0.5, 3.0) == pytest.approx(1.5)  # 7.5 - 3 - 3
    assert t.now == pytest.approx(7.5)
    with pytest.raises(ValueError, match="name it with 'model:"):
        LinkProfile("nameless", 10.0, host_layer_ms=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        LinkProfile("negative", 10.0, model="test", tail_layer_ms=-1.0)
    with pytest.raises(ValueError, match="carries the times of test"):
        Timeline(link, ModelTiming("other", 1, 1.0))
    measured = LinkProfile.load("h200-threaded-measured")
    assert measured.model == "olmoe-1b-7b-0924" and measured.host_layer_ms > measured.tail_layer_ms


def test_the_graph_cost_model_prices_a_layer_by_its_copies():
    """A layer call of the graph engine: its demand copies, then its compute beside the copies it forked
    (the longer of the two), then the fixed overhead; a wasted prefetch costs its copy all the same."""
    timing = GraphTiming(GraphLink("test", gather_gbps=10.0, prefetch_gbps=5.0, overhead_ms=0.5), MODEL)
    assert timing.layer(1, 0, 0) == pytest.approx(2.5)  # compute + overhead
    assert timing.layer(1, 3, 0) == pytest.approx(3 * 1.0 + 2.0 + 0.5)
    assert timing.layer(1, 0, 1) == pytest.approx(2.0 + 0.5)  # one prefetch (2 ms) hides behind the compute
    assert timing.layer(1, 1, 3) == pytest.approx(1.0 + 6.0 + 0.5)  # three (6 ms) do not
    assert timing.layer(5, 0, 0) == pytest.approx(4.0 + 0.5)  # a prefill's compute
    with pytest.raises(ValueError, match="prefetch_gbps must be > 0"):
        GraphLink("bad", 10.0, 0.0)
    assert GraphLink.load("h200-graph-measured").gather_gbps > 0


def test_a_graph_link_with_compute_prices_steps_and_prefills_with_its_own():
    """A profile fitted with its model's compute: a compiled step's layer takes ``step_layer_ms`` (not the
    model file's eager layer time); a prefill's call its copies + a fixed cost + a cost per token, + a host
    sync's cost when chunked; no prefetch overlap there. Another model's compute is refused by name."""
    from specmd.study.graph_sim import CallPath

    link = GraphLink("fit", gather_gbps=10.0, prefetch_gbps=5.0, overhead_ms=0.5, model="test", step_layer_ms=0.25,
                     prefill_layer_ms=1.5, prefill_token_ms=0.125, chunked_layer_ms=3.0)
    timing = GraphTiming(link, MODEL)
    assert timing.layer(1, 2, 0) == pytest.approx(2 * 1.0 + 0.25 + 0.5)
    assert timing.layer(1, 0, 1) == pytest.approx(2.0 + 0.5)  # the prefetch's copy outlasts the compute
    assert timing.layer(8, 3, 0, CallPath.GROUPED) == pytest.approx(3 * 1.0 + 1.5 + 8 * 0.125)
    assert timing.layer(8, 3, 0, CallPath.CHUNKED) == pytest.approx(3 * 1.0 + 1.5 + 8 * 0.125 + 3.0)
    # without prefill constants a prefill is priced as a step of its tokens (the gathers-only profiles)
    plain = GraphTiming(GraphLink("gathers", 10.0, 5.0, 0.5), MODEL)
    assert plain.layer(5, 0, 0, CallPath.CHUNKED) == pytest.approx(MODEL.layer_ms(5) + 0.5)
    with pytest.raises(ValueError, match="carries the times of test.*--model-timing test"):
        GraphTiming(link, ModelTiming("other", 1, 1.0))
    with pytest.raises(ValueError, match="name it with 'model:"):
        GraphLink("nameless", 10.0, 5.0, step_layer_ms=0.2)
    with pytest.raises(ValueError, match=">= 0"):
        GraphLink("negative", 10.0, 5.0, model="test", prefill_layer_ms=-1.0)
    measured = GraphLink.load("h200-graph-measured")
    assert measured.model == "olmoe-1b-7b-0924"
    assert measured.step_layer_ms < ModelTiming.load(measured.model).decode_layer_ms


def test_the_graph_schedule_estimates_time_from_its_own_counts():
    """Two layers routing two experts each, a one-token prompt and two decode steps. Two slots (lru): every
    pass misses all four, so a step is four copies and two computes. Four slots with a perfect predictor one
    layer ahead: the first step hits everything (two computes); the second misses layer 0's pair, whose call
    then prefetches layer 1's pair beside layer 0's compute (2 copies + max(compute, 2 copies) + compute)."""
    trace = RoutingTrace(2, 4, 2, [[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[2, 3], [0, 1]]], "test", ((1, 2),))
    timing = GraphTiming(GraphLink("test", gather_gbps=10.0, prefetch_gbps=10.0, overhead_ms=0.0), MODEL)
    none = simulate_graph(trace, 2, "lru", timing=timing)
    assert none.total.misses == 12 and none.estimated_tpot_ms == pytest.approx(4 * 1.0 + 2 * 2.0)
    perfect = simulate_graph(trace, 4, "lru", "perfect", timing=timing)
    assert perfect.total.prefetches == 2 and perfect.total.prefetch_hits == 2
    assert perfect.estimated_tpot_ms == pytest.approx((2 * 2.0 + (2 * 1.0 + 2.0 + 2.0)) / 2)


def cyclic_trace():
    layers = [[0, 1], [2, 3], [1, 2]]
    return RoutingTrace(3, 4, 2, [[list(ids) * 3 for ids in layers]] + [[list(ids) for ids in layers]] * 6,
                        prompts=((3, 6),))


def predicted_cyclic_trace(depth):
    """``cyclic_trace`` with candidates ``depth`` layers ahead: the ids those layers really route to."""
    plain = cyclic_trace()
    predicted = [[[ids[(layer + j + 1) % 3] for j in range(depth)] for layer in range(3)] for ids in plain.passes]
    return RoutingTrace(3, 4, 2, plain.passes, prompts=plain.prompts, predicted=predicted)


def test_simulated_times():
    trace = cyclic_trace()
    demand = simulate(trace, 2, "lru", timing=(LINK, MODEL))
    # demand-only: every miss stalls for its whole copy
    assert demand.stall_ms == pytest.approx(demand.copy_busy_ms)
    assert demand.copy_busy_ms == pytest.approx(demand.total.misses * 1.1)
    assert demand.estimated_tpot_ms == pytest.approx(3 * 2.0 + 2 * 3 * 1.1)  # 3 layers, 2 misses each
    assert demand.estimated_ttft_ms == pytest.approx(3 * MODEL.layer_ms(3) + 6 * 1.1)
    perfect = simulate(trace, 4, "least-stale", prefetch="perfect", timing=(LINK, MODEL))
    assert perfect.stall_ms < perfect.copy_busy_ms
    assert perfect.estimated_tpot_ms < demand.estimated_tpot_ms
    assert "estimated_tpot_ms" in perfect.to_dict() and "estimated_tpot_ms" not in simulate(trace, 2, "lru").to_dict()


def test_simulated_times_with_the_hosts_time_per_layer():
    """The threaded schedule priced with a host profile: each decode layer misses its 2 experts (2 ms of
    copies issued at its start), so it takes max(host, 2 ms + tail): the host's time when longer, else the
    copies and the tail."""
    trace = cyclic_trace()
    for host, per_layer in [(3.0, 3.0), (1.0, 2.5)]:
        link = LinkProfile("host", 10.0, 0.0, model="test", host_layer_ms=host, tail_layer_ms=0.5)
        stats = simulate(trace, 2, "lru", timing=(link, MODEL))
        assert stats.estimated_tpot_ms == pytest.approx(3 * per_layer), host
        assert stats.stall_ms == pytest.approx(sum(s.stall_ms for s in stats.layers))


def test_profiles_load_by_name_and_name_their_errors(tmp_path):
    assert LinkProfile.load("h100-pcie-gen5-measured").link_gbps == 43.5
    assert ModelTiming.load("olmoe-1b-7b-0924").expert_bytes == 12 * 2**20
    assert ModelTiming.load("mixtral-8x7b").expert_bytes == 336 * 2**20
    untimed = tmp_path / "untimed.yaml"  # a model file without the GPU's layer times
    untimed.write_text("\n".join(line for line in (ROOT / "configs/models/mixtral-8x7b.yaml").read_text().splitlines()
                                 if not line.startswith("timing")))
    with pytest.raises(ValueError, match="no 'timing'"):
        ModelTiming.load(untimed)
    with pytest.raises(ValueError, match="pcie-gen4-x16"):
        LinkProfile.load("pcie-gen9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("link_gbps: 10\nlatency_us: 3\n")
    with pytest.raises(ValueError, match="latency_us"):
        LinkProfile.load(bad)
    bad.write_text("copy_overhead_us: 3\n")
    with pytest.raises(ValueError, match="link_gbps"):
        LinkProfile.load(bad)
    bad.write_text("link_gbps: 0\n")
    with pytest.raises(ValueError, match="> 0"):
        LinkProfile.load(bad)


@pytest.mark.parametrize("name", ["olmoe-1b-7b-0924", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite",
                                  "gpt-oss-20b", "mixtral-8x7b"])
def test_model_shapes_build_configs(name):
    """Every shipped model shape is a valid transformers config of its family (no weights built)."""
    from specmd.study.costmodel import ModelSpec

    spec = ModelSpec.load(name)
    config = spec.transformers_config()
    assert config.num_hidden_layers == spec.config["num_hidden_layers"]


def test_a_prefetch_profile_charges_the_host_and_starts_prefetches_after_the_layer():
    """The threaded engine's prefetch terms: host time per prefetch copy issued before a compute, and with
    prefetch_after_layer those copies start when that compute ends (demand copies still start at once)."""
    link = LinkProfile("pf", link_gbps=10.0, copy_overhead_us=0.0, model="test", host_layer_ms=1.0,
                       tail_layer_ms=0.5, host_prefetch_ms=0.25, prefetch_after_layer=True)
    t = Timeline(link, MODEL)
    t.load((0, 0))  # demand: 0 -> 1
    t.load((1, 0), prefetch=True)
    t.load((1, 1), prefetch=True)
    # host 1.0 + 2 x 0.25 beside the copy (in at 1) + tail 0.5: the copy and tail are longer
    assert t.compute([(0, 0)], 0.5, 1.0) == pytest.approx(0.0) and t.now == pytest.approx(1.5)
    assert t.copy_free == pytest.approx(3.5)  # the prefetches started at 1.5, not at 1.0
    assert t.compute([(1, 0), (1, 1)], 0.5, 1.0) == pytest.approx(1.5)  # in at 3.5, + 0.5: 4.0 - 1.5 - host 1.0
    assert t.now == pytest.approx(4.0)
    eager = Timeline(LinkProfile("pf-now", 10.0, 0.0, model="test", host_layer_ms=1.0, tail_layer_ms=0.5), MODEL)
    eager.load((0, 0))
    eager.load((1, 0), prefetch=True)
    eager.compute([(0, 0)], 0.5, 1.0)
    assert eager.copy_free == pytest.approx(2.0)  # issued at once, behind the demand copy
    with pytest.raises(ValueError, match="name it with 'model:"):
        LinkProfile("nameless", 10.0, prefetch_after_layer=True)
    with pytest.raises(ValueError, match=">= 0"):
        LinkProfile("negative", 10.0, model="test", host_predict_ms=-0.1)


def test_simulated_prefetch_pays_the_predictors_host_time_per_looked_ahead_router():
    """The same trace and top-k prefetch, priced with and without host_predict_ms: a host-bound decode layer
    takes host_predict_ms x lookahead longer; without prefetch, or with the simulator's perfect prefetch (no
    router scored), nothing changes."""
    trace = predicted_cyclic_trace(2)
    base = dict(link_gbps=1000.0, copy_overhead_us=0.0, model="test", host_layer_ms=3.0, tail_layer_ms=0.1)
    without, predicting = LinkProfile("a", **base), LinkProfile("b", **base, host_predict_ms=0.5)

    def tpot(link, **prefetch):
        return simulate(trace, 4, "lru", timing=(link, MODEL), **prefetch).estimated_tpot_ms

    for lookahead in (1, 2):
        topk = dict(prefetch="topk", lookahead=lookahead)
        assert tpot(predicting, **topk) - tpot(without, **topk) == pytest.approx(3 * 0.5 * lookahead)
    assert tpot(predicting, prefetch="perfect") == pytest.approx(tpot(without, prefetch="perfect"))
    assert tpot(predicting) == pytest.approx(tpot(without))


def test_prefetches_after_the_layer_are_all_copied_in_chunked_and_warm_replays():
    """With prefetch_after_layer no prefetch is left unstarted: the copy engine's busy time is every demand
    miss and every prefetch, in a cache too small for a layer (chunked) and over a warm replay."""
    trace = predicted_cyclic_trace(1)
    link = LinkProfile("after", 10.0, 0.0, model="test", host_layer_ms=1.0, tail_layer_ms=0.5,
                       host_prefetch_ms=0.1, prefetch_after_layer=True)
    for capacity, warm in ((1, False), (3, True), (4, True)):
        stats = simulate(trace, capacity, "lru", prefetch="topk", timing=(link, MODEL), warm=warm)
        copies = stats.total.misses + stats.total.prefetches
        assert stats.copy_busy_ms == pytest.approx(copies * 1.0), (capacity, warm)
        assert (capacity == 1) or stats.total.prefetches > 0
