"""Routing replay through the live engine gives the simulator's counts exactly."""
import random
from pathlib import Path

import pytest
import torch

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.study.sim import simulate
from specmd.study.trace import RoutingTrace, load_trace
from specmd.tiny import tiny_model

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "granite-3.0-1b-a400m.json"


def synthetic_trace(num_layers=2, num_experts=8, top_k=2, prompts=((5, 6), (3, 4)), seed=0):
    """Skewed random routing: a few hot experts per layer, as trained routers have."""
    rng = random.Random(seed)
    weights = [[rng.random() ** 3 for _ in range(num_experts)] for _ in range(num_layers)]

    def token(layer):
        ids = set()
        while len(ids) < top_k:
            ids.add(rng.choices(range(num_experts), weights[layer])[0])
        return sorted(ids)

    passes = []
    for length, decode in prompts:
        passes.append([[e for _ in range(length) for e in token(layer)] for layer in range(num_layers)])
        passes += [[token(layer) for layer in range(num_layers)] for _ in range(decode)]
    return RoutingTrace(num_layers, num_experts, top_k, passes, "synthetic", tuple(prompts))


def replay_live(model, trace, budget, eviction, device, prefetch="none"):
    specmd.offload(model, budget, eviction, device, prefetch=prefetch)
    model.specmd.replay_routing(trace)
    for length, decode in trace.prompts:
        ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
    stats = model.specmd.stats()
    assert model.specmd.engine.replay.passes_done == len(trace.passes)
    model.specmd.close()
    return stats


COUNTS = ("accesses", "hits", "misses_cold", "misses_capacity", "misses_collision", "evictions")


def assert_same_counts(live, sim):
    for layer, (a, b) in enumerate(zip(live.layers, sim.layers)):
        assert [getattr(a, c) for c in COUNTS] == [getattr(b, c) for c in COUNTS], f"layer {layer}"


@pytest.mark.parametrize("eviction", sorted(specmd.POLICIES))
def test_live_replay_equals_the_simulator(eviction, device):
    trace = synthetic_trace()
    model = tiny_model("olmoe").to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    for capacity in (1, 2, 3, 5, 16):
        live = replay_live(model, trace, capacity * expert, eviction, device)
        assert_same_counts(live, simulate(trace, capacity, eviction))


@pytest.mark.parametrize("eviction", ["lru", "least-stale", "layer-distance"])
def test_a_warmed_up_replay_equals_the_warm_simulator(eviction, device):
    """A bench row counts the replay after a whole warm-up replay (rewound, counters reset): simulate(warm=True)
    counts the same, where a cold simulation (the first replay's counts) differs."""
    trace = synthetic_trace()
    model = tiny_model("olmoe").to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    for capacity in (3, 5):
        specmd.offload(model, capacity * expert, eviction, device)
        model.specmd.replay_routing(trace)
        for counted in (False, True):
            if counted:
                model.specmd.rewind_replay()
                model.specmd.reset_stats()
            for length, decode in trace.prompts:
                ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
                model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
        live = model.specmd.stats()
        model.specmd.close()
        warm = simulate(trace, capacity, eviction, warm=True)
        assert_same_counts(live, warm)
        assert warm.forward_passes == len(trace.passes)
        assert simulate(trace, capacity, eviction).total.misses_cold > 0 == warm.total.misses_cold
    with pytest.raises(ValueError, match="belady without warm"):
        simulate(trace, 3, "belady", warm=True)


def test_replay_with_prefetch_keeps_demand_counts_consistent(device):
    # The simulator has no prefetch yet: check the live run's own bookkeeping under replay + watchdog.
    trace = synthetic_trace(seed=1)
    model = tiny_model("olmoe").to(device)
    stats = replay_live(model, trace, "50%", "least-stale", device, prefetch="topk")
    t = stats.total
    assert t.accesses == t.hits + t.misses == simulate(trace, 8, "lru").total.accesses
    assert t.prefetch_hits <= t.hits


def test_replay_checks_topology_and_lengths(device):
    model = specmd.offload(tiny_model("olmoe"), "50%", device=device)
    with pytest.raises(ValueError, match="same topology"):
        model.specmd.replay_routing(synthetic_trace(num_layers=3))
    model.specmd.replay_routing(synthetic_trace())  # first prompt has 5 tokens
    with pytest.raises(ValueError, match="feed the trace's prompts"):
        model.generate(torch.tensor([[4, 5, 6]]).to(device), max_new_tokens=2, do_sample=False)
    model.specmd.close()


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="the shared Granite trace is not on this machine")
def test_granite_trace_replayed_live_matches_the_reference(device):
    trace = load_trace(SHARED_TRACE)
    model = tiny_model("granitemoe", num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=8,
                       max_position_embeddings=256).to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    live = replay_live(model, trace, 192 * expert, "lru", device)
    assert_same_counts(live, simulate(trace, 192, "lru"))
    assert round(100 * live.hit_rate, 1) == 39.6 and live.total.misses_collision == 497  # README figure


PREFETCH_COUNTS = COUNTS + ("prefetch_hits", "prefetches")


@pytest.mark.parametrize("eviction", sorted(specmd.POLICIES))
def test_live_inline_prefetch_equals_the_simulator(eviction, device):
    """With prefetch: record a run's routing and predictions, then simulate the recording; inline prefetch
    makes the live run deterministic, so every count matches."""
    from specmd.runtime.prefetch import PrefetchConfig

    model = tiny_model("olmoe", num_hidden_layers=3, num_experts=8).to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    prefetched = 0
    for capacity, lookahead in ((2, 1), (4, 2), (6, 3)):
        config = PrefetchConfig(policy="topk", lookahead=lookahead, inline=True)
        specmd.offload(model, capacity * expert, eviction, device, prefetch=config)
        recorder = model.specmd.record_routing(lookahead=lookahead)
        for length, decode in ((6, 5), (3, 4)):
            ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
            model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
        live = model.specmd.stats()
        model.specmd.close()
        trace = RoutingTrace(recorder.num_layers, recorder.num_experts, recorder.top_k,
                             [[layer["ids"] for layer in p["layers"]] for p in recorder.passes], "recorded",
                             predicted=[[layer["predicted"] for layer in p["layers"]] for p in recorder.passes])
        sim = simulate(trace, capacity, eviction, prefetch="topk", lookahead=lookahead)
        for layer, (a, b) in enumerate(zip(live.layers, sim.layers)):
            assert [getattr(a, c) for c in PREFETCH_COUNTS] == [getattr(b, c) for c in PREFETCH_COUNTS], \
                (capacity, lookahead, layer)
            # wasted prefetches, counted in experts (the simulator's experts weigh one byte)
            assert a.wasted_prefetch_bytes // live.expert_bytes == b.wasted_prefetch_bytes
        prefetched += live.total.prefetches
    assert prefetched > 0  # two slots leave no room beside a pinned layer; the larger caches prefetch


def test_perfect_prefetch_bounds_topk():
    trace = synthetic_trace(num_layers=3, seed=2)
    demand = simulate(trace, 4, "least-stale").hit_rate
    perfect = simulate(trace, 4, "least-stale", prefetch="perfect", lookahead=1).hit_rate
    assert perfect > demand


def recorded_trace(model, lookahead, device, prompts=((6, 5), (3, 4))):
    """A trace of ``model``'s own routing and its predictor's candidates (``lookahead`` layers ahead)."""
    specmd.offload(model, "100%", "lru", device)
    recorder = model.specmd.record_routing(lookahead=lookahead, model="recording")
    for length, decode in prompts:
        ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
    model.specmd.close()
    return RoutingTrace(recorder.num_layers, recorder.num_experts, recorder.top_k,
                        [[layer["ids"] for layer in p["layers"]] for p in recorder.passes], "recorded",
                        tuple(prompts), [[layer["predicted"] for layer in p["layers"]] for p in recorder.passes])


@pytest.mark.parametrize("eviction", ["lru", "least-stale", "layer-distance"])
def test_replayed_speculation_equals_the_simulator(eviction, device):
    """Under replay the prefetch candidates come from the trace: a model whose routers differ from the
    recording's (another seed) gives the simulator's counts on that trace, prefetches included, at 5% and
    20%; so a live run sees the recorded predictor, not its own."""
    from specmd.runtime.prefetch import PrefetchConfig

    shape = dict(num_hidden_layers=4, num_experts=16)
    trace = recorded_trace(tiny_model("olmoe", seed=1, **shape).to(device), 2, device)
    model = tiny_model("olmoe", seed=2, **shape).to(device)
    for budget, capacity in (("5%", 3), ("20%", 12)):
        for lookahead in (1, 2):
            config = PrefetchConfig(policy="topk", lookahead=lookahead, inline=True)
            specmd.offload(model, budget, eviction, device, prefetch=config)
            assert model.specmd.num_slots == capacity
            model.specmd.replay_routing(trace)
            for length, decode in trace.prompts:
                ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
                model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
            live = model.specmd.stats()
            model.specmd.close()
            sim = simulate(trace, capacity, eviction, prefetch="topk", lookahead=lookahead)
            for layer, (a, b) in enumerate(zip(live.layers, sim.layers)):
                assert [getattr(a, c) for c in PREFETCH_COUNTS] == [getattr(b, c) for c in PREFETCH_COUNTS], \
                    (budget, lookahead, layer)
            assert live.total.prefetches > 0


def test_replayed_speculation_refuses_what_the_trace_cannot_answer(device, caplog):
    trace = recorded_trace(tiny_model("olmoe", num_hidden_layers=3), 1, device, prompts=((4, 2),))
    model = specmd.offload(tiny_model("olmoe", num_hidden_layers=3), "50%", device=device, prefetch="top-p")
    with pytest.raises(ValueError, match="use prefetch='topk'"):
        model.specmd.replay_routing(trace)
    model.specmd.close()
    specmd.offload(model, "50%", device=device, prefetch="topk", lookahead=2)
    with pytest.raises(ValueError, match="lookahead <= 1"):
        model.specmd.replay_routing(trace)
    with caplog.at_level("WARNING"):
        model.specmd.replay_routing(synthetic_trace(num_layers=3))  # ids only
    assert any("routed ids only" in r.getMessage() for r in caplog.records)
    model.specmd.close()


def replay_graph(model, trace, capacity, eviction, device, generate_kwargs):
    """``replay_live`` through the graph engine, generating with ``generate_kwargs`` (``compiled_generate``:
    compiled decode steps, checked to trace without a graph break; else uncompiled)."""
    from torch._dynamo.utils import counters

    expert = find_moe_layers(model)[0].layout.expert_bytes
    specmd.offload(model, capacity * expert, eviction, device, engine="graph")
    model.specmd.replay_routing(trace)
    torch._dynamo.reset()
    counters.clear()
    for length, decode in trace.prompts:
        ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False,
                       **generate_kwargs)
    if not generate_kwargs["disable_compile"]:
        assert not counters["graph_break"]
    stats = model.specmd.stats()
    assert model.specmd.engine.replay.passes_done == len(trace.passes)
    model.specmd.close()
    return stats


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("eviction", ["lru", "least-stale"])
def test_graph_engine_replay_equals_the_simulator(eviction, compiled, device, compiled_generate):
    """Replay through the graph engine, its decode steps uncompiled (host ids) or compiled (the ids and the
    pass counter on the device): the simulator's counts."""
    trace = synthetic_trace(prompts=((5, 6), (3, 4), (4, 3)))
    model = tiny_model("olmoe").to(device)
    model.set_experts_implementation("batched_mm")  # decode steps through the device path, as on a GPU
    for capacity in (2, 5):  # a one-token step needs top-2 slots
        kwargs = compiled_generate if compiled else dict(cache_implementation="static", disable_compile=True)
        live = replay_graph(model, trace, capacity, eviction, device, kwargs)
        assert_same_counts(live, simulate(trace, capacity, eviction))


def replaying_on_the_device_path(trace, device):
    """A tiny OLMoE offloaded to the graph engine (decode steps through its device path), replaying ``trace``,
    dynamo's caches cleared."""
    model = tiny_model("olmoe").to(device)
    model.set_experts_implementation("batched_mm")
    specmd.offload(model, "50%", "lru", device, engine="graph")
    model.specmd.replay_routing(trace)
    torch._dynamo.reset()
    return model


def test_a_compiled_step_that_cannot_replay_its_pass_is_reported(device, compiled_generate):
    """A compiled decode step cannot raise: one that meets a pass it cannot replay (here the next prompt's
    prefill, because the generate ran one step more than the trace recorded) is counted on the device, and
    the next uncompiled pass raises."""
    model = replaying_on_the_device_path(synthetic_trace(prompts=((5, 3), (3, 2))), device)
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(5)).to(device)
    model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, **compiled_generate)  # 4 steps; 3 traced
    with pytest.raises(ValueError, match="1 compiled decode steps met a pass"):
        model.generate(ids[:, :3], max_new_tokens=3, min_new_tokens=3, do_sample=False, **compiled_generate)
    model.specmd.close()


def test_a_one_token_prompt_is_never_replayed_as_a_decode_step(device, compiled_generate, caplog):
    """A compiled step that runs one step too many lands on the next prompt's prefill; a one-token prefill
    looks like a decode step, but is counted as a pass it cannot replay; dropping the replay says so."""
    model = replaying_on_the_device_path(synthetic_trace(prompts=((3, 2), (1, 2))), device)
    ids = torch.randint(3, 200, (1, 3), generator=torch.Generator().manual_seed(3)).to(device)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **compiled_generate)  # 3 steps; 2 traced
    assert int(model.specmd.engine.replay.wrong) == 1
    with caplog.at_level("WARNING"):
        model.specmd.replay_routing(None)
    assert any("1 compiled decode steps met a pass" in r.getMessage() for r in caplog.records)
    model.specmd.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_the_graph_engine_replays_the_traces_speculation(compiled, device, compiled_generate):
    """Under a trace with predictions, the graph engine prefetches the trace's candidates (decode steps),
    compiled or not, with the same counts both ways; the accesses stay the trace's, and a perfect recorded
    predictor (the trace's own next-layer ids as candidates) turns the next layer's misses into hits."""
    trace = synthetic_trace(num_layers=3, prompts=((5, 6), (3, 4)))
    # candidates at lookahead 1: the ids the next layer really routes (a perfect predictor), decode passes only
    predicted = [[[list(layers[layer + 1]) if layer + 1 < 3 else [0, 1]] for layer in range(3)] for layers in
                 trace.passes]
    trace = RoutingTrace(trace.num_layers, trace.num_experts, trace.top_k, trace.passes, "perfect", trace.prompts,
                         predicted)
    model = tiny_model("olmoe", num_hidden_layers=3).to(device)
    model.set_experts_implementation("batched_mm")
    expert = find_moe_layers(model)[0].layout.expert_bytes
    runs = {}
    for prefetch in ("none", "topk"):
        kwargs = compiled_generate if compiled else dict(cache_implementation="static", disable_compile=True)
        specmd.offload(model, 4 * expert, "lru", device, engine="graph", prefetch=prefetch)  # 2 layers' top-2
        model.specmd.replay_routing(trace)
        torch._dynamo.reset()
        for length, decode in trace.prompts:
            ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
            model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False, **kwargs)
        runs[prefetch] = model.specmd.stats()
        model.specmd.close()
    none, topk = runs["none"], runs["topk"]
    assert topk.total.accesses == none.total.accesses
    assert topk.total.prefetches > 0 and topk.layers[0].prefetches == 0
    # layers 1 and 2 are prefetched perfectly in every decode step: they miss only in the prefills
    decode_accesses = sum(len(set(trace.passes[p][2])) for p in range(len(trace.passes))
                          if p not in trace.prefill_passes)
    assert topk.layers[2].hits >= decode_accesses > none.layers[2].hits


@pytest.mark.parametrize("engine", ["threaded", "graph"])
def test_a_rewound_replay_runs_the_trace_again_in_place(engine, device):
    """rewind_replay starts the same replay over (what a timed replay after a warm-up one needs: a new
    replay_routing would drop the graph engine's captured steps); the second run counts what the first did
    on a cache in the same state, and a rewind with no replay set is refused by name."""
    shape = dict(num_hidden_layers=3, num_experts=8)
    trace = recorded_trace(tiny_model("olmoe", seed=1, **shape).to(device), 1, device)
    model = tiny_model("olmoe", seed=2, **shape).to(device)
    specmd.offload(model, "100%", "lru", device, engine=engine)
    with pytest.raises(ValueError, match="replay_routing"):
        model.specmd.rewind_replay()
    model.specmd.replay_routing(trace)
    replay = model.specmd.engine.replay
    counts = []
    for _ in range(2):
        model.specmd.reset_stats()
        for (tokens, decode), seed in zip(trace.prompts, range(9)):
            ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
            model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False,
                           disable_compile=True)
        assert replay.passes_done == len(trace.passes)
        counts.append(model.specmd.stats().total.accesses)
        model.specmd.rewind_replay()
        assert model.specmd.engine.replay is replay and replay.passes_done == 0
    assert counts[0] == counts[1] > 0
    model.specmd.close()


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("eviction", ["lru", "layer-distance", "least-stale"])
def test_the_graph_schedule_simulator_equals_the_graph_engine(eviction, implementation, device):
    """simulate_graph drives the graph engine's device cache as the engine does under replay: after a warm-up
    replay and a rewind (what graph_h100.py times), every per-layer count of the live engine, prefetch hits
    and wasted prefetches included, equals the simulator's, at two budgets, with and without the trace's
    speculation one and two layers ahead, through either experts kernel (batched: device steps with
    prefetch; grouped: the device prefill, and on the CPU grouped decode steps, which do not prefetch)."""
    from specmd.runtime.compute import GROUPED_MM_MAX_GROUPS, KernelPlan
    from specmd.study.graph_sim import simulate_graph

    counts = PREFETCH_COUNTS + ("misses_cold", "evictions")
    shape = dict(num_hidden_layers=4, num_experts=16)
    trace = recorded_trace(tiny_model("olmoe", seed=1, **shape).to(device), 2, device)
    model = tiny_model("olmoe", seed=2, **shape).to(device)
    model.set_experts_implementation(implementation)
    kernels = KernelPlan.mirroring(implementation, torch.device(device).type)
    grouped_max = GROUPED_MM_MAX_GROUPS if torch.device(device).type == "cuda" else None
    expert = find_moe_layers(model)[0].layout.expert_bytes
    for capacity in (3, 12):
        for prefetch, lookahead in (("none", 1), ("topk", 1), ("topk", 2)):
            specmd.offload(model, capacity * expert, eviction, device, engine="graph", prefetch=prefetch,
                           lookahead=lookahead)
            model.specmd.replay_routing(trace)
            for run in range(2):  # a warm-up replay, then the counted one on the same cache
                model.specmd.reset_stats()
                for length, decode in trace.prompts:
                    ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length))
                    model.generate(ids.to(device), max_new_tokens=decode + 1, min_new_tokens=decode + 1,
                                   do_sample=False, cache_implementation="static", disable_compile=True)
                model.specmd.rewind_replay()
            live = model.specmd.stats()
            model.specmd.close()
            sim = simulate_graph(trace, capacity, eviction, prefetch, lookahead, warm=True, kernels=kernels,
                                 grouped_max_slots=grouped_max)
            for layer, (a, b) in enumerate(zip(live.layers, sim.layers, strict=True)):
                assert [getattr(a, c) for c in counts] == [getattr(b, c) for c in counts], \
                    (capacity, prefetch, lookahead, layer)
                assert a.wasted_prefetch_bytes // expert == b.wasted_prefetch_bytes
            assert live.total.misses_cold == 0  # warm: the counted replay found every expert loaded before
            # the device step prefetches; the CPU's grouped decode step does not
            prefetches = prefetch != "none" and kernels.decode.value == "batched"
            assert (live.total.prefetches > 0) == prefetches, (capacity, prefetch, lookahead)
