"""The graph engine: a decode step through batched products runs without reading anything back (no chunked
path), the outputs stay the unpatched model's, and what it does not do yet is refused by name."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.runtime.engines import graph
from specmd.runtime.engines.graph import CallPath, GraphEngine
from specmd.tiny import tiny_model


def generate(model, ids, tokens=8, compiled=False):
    """Greedy tokens; uncompiled unless asked (on CUDA the graph engine's generate compiles by default,
    which ``test_the_whole_decode_step_is_compiled_into_one_graph`` covers)."""
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          disable_compile=not compiled)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("eviction", ["lru", "least-stale"])
def test_decode_steps_take_the_sync_free_path(family, eviction, monkeypatch, device):
    """With transformers' batched products (what generate uses for decode on a GPU), every decode step whose
    routed experts fit the pool goes through the device path alone; prefill and wider steps are chunked."""
    ref = tiny_model(family).to(device)
    ref.set_experts_implementation("batched_mm")
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    want = generate(ref, ids)
    model = tiny_model(family)
    model.set_experts_implementation("batched_mm")
    top_k, expert = model.config.num_experts_per_tok, find_moe_layers(model)[0].layout.expert_bytes
    chunked = []
    real = GraphEngine._chunked
    monkeypatch.setattr(GraphEngine, "_chunked", lambda self, layer, module, hidden, *rest: chunked.append(
        hidden.shape[0]) or real(self, layer, module, hidden, *rest))
    specmd.offload(model, 2 * top_k * expert, eviction, device, engine="graph")  # a decode step of batch 2 fits
    assert torch.equal(generate(model, ids), want)
    assert chunked and all(tokens > 2 for tokens in chunked)  # only the prefill (14 tokens) was chunked
    stats = model.specmd.stats()
    assert stats.total.accesses == stats.total.hits + stats.total.misses > 0
    model.specmd.close()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("eviction", ["lru", "least-stale"])
def test_a_prefill_whose_experts_fit_runs_on_the_device(family, eviction, monkeypatch, device):
    """With transformers' grouped products (its default: prefill, and decode on the CPU), a call whose
    distinct experts fit the pool runs through the device cache and one grouped product over the slot-sorted
    rows, never the main loop's chunks; tokens and every counter equal the chunked path's."""
    ref = tiny_model(family).to(device)
    ref.set_experts_implementation("grouped_mm")
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    want = generate(ref, ids)
    num_experts = find_moe_layers(ref)[0].layout.num_experts
    budget = num_experts * find_moe_layers(ref)[0].layout.expert_bytes  # one layer's experts: every call fits
    runs = {}
    for path in ("device", "chunked"):
        model = tiny_model(family).to(device)
        model.set_experts_implementation("grouped_mm")
        chunked = []
        real = GraphEngine._chunked
        monkeypatch.setattr(GraphEngine, "_chunked", lambda self, *args: chunked.append(1) or real(self, *args))
        if path == "chunked":  # every call the device prefill would take runs chunked instead
            real_path = graph.call_path
            monkeypatch.setattr(graph, "call_path", lambda *args: CallPath.CHUNKED
                                if real_path(*args) is CallPath.GROUPED else real_path(*args))
        specmd.offload(model, budget, eviction, device, engine="graph")
        assert torch.equal(generate(model, ids), want), path
        runs[path] = model.specmd.stats()
        model.specmd.close()
        monkeypatch.undo()
        if path == "device":
            assert not chunked  # prefill included
        else:
            assert chunked
    assert [vars(s) for s in runs["device"].layers] == [vars(s) for s in runs["chunked"].layers]
    assert runs["device"].total.misses > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's grouped product on the device: CUDA, bf16")
@pytest.mark.parametrize("tokens", [7, 1100])
def test_the_device_prefill_keeps_transformers_tokens_in_bf16(tokens):
    """The grouped prefill on the device gives transformers' grouped_mm tokens in bf16, where its product
    groups rows over the pool's S slots and transformers' over the E experts: at 7 tokens both products are
    the small-group kernel; at 1100 tokens (2200 rows: 137 a group over 16 experts, 69 over 32 slots) they
    fall on either side of torch's 128-rows-a-group choice of kernel."""
    shape = dict(num_hidden_layers=4, num_experts=16, max_position_embeddings=2048, dtype=torch.bfloat16)
    ref = tiny_model("olmoe", **shape).cuda()
    ref.set_experts_implementation("grouped_mm")
    ids = torch.randint(3, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens)).cuda()
    want = generate(ref, ids, 4)
    chunked = []
    real = GraphEngine._chunked
    try:
        GraphEngine._chunked = lambda self, *args: chunked.append(1) or real(self, *args)
        specmd.offload(ref, "50%", "lru", "cuda", engine="graph")  # 32 slots, not 16
        assert torch.equal(generate(ref, ids, 4), want)
        assert not chunked  # the prefill ran on the device
    finally:
        GraphEngine._chunked = real
        ref.specmd.close()


def test_what_the_graph_engine_does_not_do_is_refused(device):
    with pytest.raises(ValueError, match="leave them unset"):
        specmd.offload(tiny_model("olmoe"), "50%", device=device, engine="graph",
                       prefetch={"policy": "topk", "inline": True})
    with pytest.raises(ValueError, match="pass engine='graph'"):  # the graph engine's knob, on the other engine
        specmd.offload(tiny_model("olmoe"), "50%", device=device, prefetch={"policy": "topk", "gather_programs": 8})
    with pytest.raises(ValueError, match="gather_programs=-1"):
        specmd.offload(tiny_model("olmoe"), "50%", device=device, engine="graph",
                       prefetch={"policy": "topk", "gather_programs": -1})
    with pytest.raises(ValueError, match="least-stale"):
        specmd.offload(tiny_model("olmoe"), "50%", "random", device, engine="graph")
    with pytest.raises(ValueError, match="threaded, graph"):
        specmd.offload(tiny_model("olmoe"), "50%", device=device, engine="fast")
    model = specmd.offload(tiny_model("olmoe"), "50%", device=device, engine="graph")
    with pytest.raises(ValueError, match="engine='threaded'"):
        model.specmd.record_routing()
    model.specmd.close()


def test_offload_under_inference_mode_then_generate_outside(device):
    with torch.inference_mode():
        model = specmd.offload(tiny_model("olmoe"), "25%", device=device, engine="graph")
        generate(model, torch.tensor([[5, 6, 7]], device=device))
    generate(model, torch.tensor([[5, 6, 7]], device=device))  # no_grad only: the cache's state still updates
    assert model.specmd.stats().forward_passes == 16
    model.specmd.close()


def test_stats_and_reset(device):
    model = specmd.offload(tiny_model("mixtral"), "25%", "lfu", device, engine="graph")
    ids = torch.tensor([[5, 6, 7, 8]], device=device)
    generate(model, ids)
    first = model.specmd.stats()
    assert first.forward_passes == 8 and first.total.misses_cold > 0
    assert len(model.specmd.resident_experts()) == model.specmd.num_slots
    model.specmd.reset_stats()
    generate(model, ids)
    again = model.specmd.stats()
    assert again.forward_passes == 8 and again.total.accesses == first.total.accesses
    model.specmd.close()
    assert model.specmd.stats().total.accesses == again.total.accesses


def graph_runs(model, ids, want, budget, eviction, lookahead, compiled_generate, variants, check=None) -> dict:
    """{name: stats} of a 10-token generate per (name, offload options, compiled) in ``variants``, each through
    a fresh graph engine, asserting its tokens are ``want`` (and ``check(model)`` once offloaded)."""
    runs = {}
    for name, options, compiled in variants:
        torch._dynamo.reset()
        specmd.offload(model, budget, eviction, ids.device.type, engine="graph", lookahead=lookahead, **options)
        assert check is None or check(model), name
        kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
        kwargs.update(compiled_generate if compiled else {"disable_compile": True})
        assert torch.equal(model.generate(ids, **kwargs), want), name
        runs[name] = model.specmd.stats()
        model.specmd.close()
        model.generation_config.cache_implementation = None
    return runs


@pytest.mark.parametrize("prefetch,lookahead", [("topk", 1), ("topk", 2), ("top-p", 1)])
@pytest.mark.parametrize("eviction", ["lru", "least-stale"])
def test_prefetch_keeps_the_tokens_and_counts_its_copies(prefetch, lookahead, eviction, device, compiled_generate):
    """Prefetch calls after each device step: the tokens stay the unpatched model's, the accesses stay those
    of the run without prefetch (the routers decide them), the copies are counted as prefetches, and a
    compiled step (on CUDA: the prefetches on a side stream, one CUDA graph) makes the same cache decisions
    as the uncompiled one."""
    ref = tiny_model("olmoe", num_hidden_layers=4).to(device)
    ref.set_experts_implementation("batched_mm")
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    want = generate(ref, ids, 10)
    top_k, expert = ref.config.num_experts_per_tok, find_moe_layers(ref)[0].layout.expert_bytes
    budget = 2 * top_k * (lookahead + 1) * expert  # batch 2: a decode step and its prefetches fit
    runs = graph_runs(ref, ids, want, budget, eviction, lookahead, compiled_generate,
                      [("none", {}, False), ("uncompiled", {"prefetch": prefetch}, False),
                       ("compiled", {"prefetch": prefetch}, True)])
    assert runs["none"].total.prefetches == 0 < runs["uncompiled"].total.prefetches
    assert runs["uncompiled"].total.accesses == runs["none"].total.accesses
    assert [vars(s) for s in runs["compiled"].layers] == [vars(s) for s in runs["uncompiled"].layers]
    assert runs["uncompiled"].layers[0].prefetches == 0  # layer 0 is only predicted across passes: not done
    # prefetch hits and wasted prefetches are counted on the device, the same compiled or not (above); what is
    # not counted (lateness, precision) is said, not shown as zeros
    assert runs["uncompiled"].total.prefetch_hits > 0
    assert runs["uncompiled"].total.prefetch_hits <= runs["uncompiled"].total.prefetches
    assert not runs["uncompiled"].prefetch_outcomes_counted and "not counted" in runs["uncompiled"].summary()
    total = runs["uncompiled"].total
    assert total.bytes_copied == (total.misses + total.prefetches) * expert == total.prefetch_bytes + total.misses * expert


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # gpt_oss: routers with a bias
@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_the_side_stream_scores_as_the_predictor_ranks(lookahead, family, device):
    """A compiled one-token step makes its top-k predictions on the prefetch side stream, into persistent
    buffers (``gather._score``): the candidates are the predictor's own, layer by layer."""
    from specmd.runtime.gather import _score
    from specmd.runtime.prefetch import Predictor, PrefetchConfig

    model = tiny_model(family, num_hidden_layers=4).to(device)
    layers = find_moe_layers(model)
    routers = [layer.router for layer in layers]
    predictor = Predictor(PrefetchConfig("topk", lookahead=lookahead), routers, 2)
    buffers = graph._score_buffers(predictor, torch.device(device))
    hidden = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(device)
    for layer in range(len(layers)):
        targets = predictor.targets(layer)
        held = torch.full((3, model.config.num_experts), -1, dtype=torch.int64, device=device)
        buffers[0].copy_(hidden.reshape(-1))
        biases = [routers[t].bias for t in targets] if getattr(routers[0], "bias", None) is not None else []
        _score([routers[t].weight for t in targets], biases, buffers, held[:len(targets), :predictor.candidates])
        want = predictor.predict(layer, hidden, stacked=False)
        assert torch.equal(held[:len(targets), :predictor.candidates], want), layer
        assert (held[len(targets):] == -1).all()
    # what the engine hands the op: every target's router and bias, or no side scoring (the model's stream
    # predicts) where the step is not one token or the routers' biases are mixed
    from types import SimpleNamespace

    engine = SimpleNamespace(predictor=predictor, _score_buffers=buffers, replay=None, _trace_predicts=False)
    engine._ahead = lambda layer: GraphEngine._ahead(engine, layer)
    scoring = GraphEngine._side_scoring(engine, 0, hidden)
    assert [w is routers[t].weight for w, t in zip(scoring.weights, predictor.targets(0))] == [True] * lookahead
    assert len(scoring.biases) == (lookahead if family == "gpt_oss" else 0) and scoring.k == predictor.candidates
    assert GraphEngine._side_scoring(engine, 0, hidden.expand(2, -1)) is None
    if family == "gpt_oss" and lookahead > 1:
        routers[predictor.targets(0)[1]].bias = None
        assert GraphEngine._side_scoring(engine, 0, hidden) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream runs in a compiled step on CUDA")
@pytest.mark.parametrize("lookahead", [1, 2])
def test_a_compiled_one_token_step_predicts_on_the_side_stream(lookahead, compiled_generate):
    """One sequence: the compiled step scores on the side stream (the model's stream only copies the input);
    its tokens are the unpatched model's and its cache decisions those of the uncompiled step, which predicts
    on the model's stream."""
    device = "cuda"
    ref = tiny_model("olmoe", num_hidden_layers=4).to(device)
    ref.set_experts_implementation("batched_mm")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2)).to(device)
    want = generate(ref, ids, 10)
    top_k, expert = ref.config.num_experts_per_tok, find_moe_layers(ref)[0].layout.expert_bytes
    runs = graph_runs(ref, ids, want, top_k * (lookahead + 1) * expert, "lru", lookahead, compiled_generate,
                      [(name, {"prefetch": "topk"}, compiled) for name, compiled in [("uncompiled", False),
                                                                                  ("compiled", True)]],
                      check=lambda model: model.specmd.engine._score_buffers is not None)
    assert runs["uncompiled"].total.prefetches > 0
    assert [vars(s) for s in runs["compiled"].layers] == [vars(s) for s in runs["uncompiled"].layers]


def test_prefetch_is_off_where_every_expert_stays_resident(device, caplog):
    """At a budget that holds every expert a prefetch could copy nothing: the engine runs no predictor (no
    router products, no prefetch calls), says so in one line, and the tokens and counts are those without
    prefetch; one expert fewer and it prefetches."""
    model = tiny_model("olmoe", num_hidden_layers=3).to(device)
    model.set_experts_implementation("batched_mm")
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(3)).to(device)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, disable_compile=True)
    specmd.offload(model, "100%", "lru", device, engine="graph")
    want, counts = model.generate(ids, **kwargs), vars(model.specmd.stats().total)
    model.specmd.close()
    with caplog.at_level("INFO", logger="specmd.api"):
        specmd.offload(model, "100%", "lru", device, engine="graph", prefetch="topk")
    assert model.specmd.engine.predictor is None
    assert any("nothing to copy" in r.getMessage() for r in caplog.records)
    assert torch.equal(model.generate(ids, **kwargs), want) and vars(model.specmd.stats().total) == counts
    total_experts = model.specmd.num_slots
    model.specmd.close()
    expert = find_moe_layers(model)[0].layout.expert_bytes
    specmd.offload(model, (total_experts - 1) * expert, "lru", device, engine="graph", prefetch="topk")
    assert model.specmd.engine.predictor is not None
    model.specmd.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on CUDA")
@pytest.mark.parametrize("eviction", ["lru", "lfu", "least-stale"])
def test_captured_decode_steps_stay_identical_over_generates(eviction):
    """Each layer's decode step is captured on its second call and replayed after: tokens and counters stay
    those of the uncaptured steps over several generates (the cache's state moves only by replays)."""
    ref = tiny_model("olmoe", dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    want = generate(ref, ids, 12)
    expert = find_moe_layers(ref)[0].layout.expert_bytes
    specmd.offload(ref, 3 * expert, eviction, "cuda", engine="graph")  # top-2 decode fits; misses every step
    for _ in range(3):
        assert torch.equal(generate(ref, ids, 12), want)
    assert ref.specmd.engine.captured_graphs == 2  # one per MoE layer at batch 1
    stats = ref.specmd.stats()
    assert stats.forward_passes == 36 and stats.total.accesses == stats.total.hits + stats.total.misses
    ref.specmd.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate compiles the decode step on CUDA")
def test_the_whole_decode_step_is_compiled_into_one_graph():
    """On CUDA, generate compiles the graph engine's decode step (the static cache offload chose; transformers'
    CompileConfig, CUDA graphs): traced in one piece, tokens equal to the compiled full-GPU model's, counters
    equal to the uncompiled engine's over the same generates, and close gives the cache choice back."""
    from torch._dynamo.utils import counters

    ref = tiny_model("olmoe", dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    want_eager = generate(ref, ids, 12)
    ref.generation_config.cache_implementation = "static"
    want_compiled = generate(ref, ids, 12, compiled=True)
    ref.generation_config.cache_implementation = None
    expert = find_moe_layers(ref)[0].layout.expert_bytes
    stats = {}
    for compiled in (True, False):
        torch._dynamo.reset()
        counters.clear()
        specmd.offload(ref, 3 * expert, "lru", "cuda", engine="graph")  # top-2 decode fits; misses every step
        assert ref.generation_config.cache_implementation == "static"
        for _ in range(3):
            assert torch.equal(generate(ref, ids, 12, compiled), want_compiled if compiled else want_eager)
        if compiled:
            assert not counters["graph_break"] and ref.specmd.engine.captured_graphs == 0
        stats[compiled] = ref.specmd.stats()
        ref.specmd.close()
        assert ref.generation_config.cache_implementation is None
    assert stats[True].forward_passes == stats[False].forward_passes == 36
    assert [vars(s) for s in stats[True].layers] == [vars(s) for s in stats[False].layers]


# Ops that read a CUDA tensor back to the host (or size their output from its values) in eager PyTorch.
_READ_BACK = ("aten._local_scalar_dense", "aten.nonzero", "aten.repeat_interleave", "aten.masked_select")


class _HostTrafficSpy(TorchDispatchMode):
    """Records every op that mixes a host tensor with device ("meta") tensors (a copy a CUDA graph refuses)
    and every op that reads values back; and every item assignment of a Python scalar, which eager CUDA
    turns into a copy of a host tensor."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        if {"cpu", "meta"} <= {t.device.type for t in tensors} or str(func).startswith(_READ_BACK):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        setitem = self._setitem = torch.Tensor.__setitem__

        def checked(tensor, index, value):
            if isinstance(value, (bool, int, float)):
                self.found.append(f"tensor[...] = {value!r}")
            return setitem(tensor, index, value)

        torch.Tensor.__setitem__ = checked
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.__setitem__ = self._setitem
        return super().__exit__(*exc)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "fifo", "layer-distance", "least-stale"])
def test_the_device_step_never_reads_the_device_back(eviction):
    """The decode step on the "meta" device, which holds no data: any read back to the host (.item(),
    .tolist(), a boolean mask, nonzero) raises there, and no op may bring a host tensor in (a CUDA graph
    refuses the copy). This is what keeps the step capturable without a GPU to prove it."""
    from specmd.runtime.compute import Kernel, KernelPlan
    from specmd.runtime.copier import SlotPool
    from specmd.runtime.device_cache import DeviceCache

    meta = torch.device("meta")
    with meta:
        model = tiny_model("olmoe", dtype=torch.bfloat16)
    layers = find_moe_layers(model)
    cache = DeviceCache(len(layers), layers[0].layout.num_experts, 3, eviction, meta)
    pool = SlotPool(layers[0].layout, 3, meta)
    from specmd.runtime.prefetch import Predictor, PrefetchConfig

    # with top-p prefetch (the predictor's longest path: softmax, mean, sort, cumulative mass)
    predictor = Predictor(PrefetchConfig("top-p"), [layer.router for layer in layers], 2)
    engine = GraphEngine(layers, cache, pool, KernelPlan(Kernel.BATCHED, Kernel.BATCHED),
                         3 * layers[0].layout.expert_bytes, predictor)
    hidden = torch.empty(1, 64, dtype=torch.bfloat16, device=meta)
    ids = torch.empty(1, 2, dtype=torch.int64, device=meta)
    weights = torch.empty(1, 2, dtype=torch.bfloat16, device=meta)
    with _HostTrafficSpy() as spy:
        cache.begin_pass()
        for layer in (0, 1):
            out = engine._device_step(layer, layers[layer].module, hidden, ids, weights)
    assert out.shape == (1, 64) and spy.found == []


@pytest.mark.parametrize("prefetch", ["none", "top-p"])
def test_the_decode_step_traces_in_one_piece(prefetch, device, compiled_generate):
    """What generate's compiled decode needs, on the CPU (torch.compile's eager backend: dynamo's tracing
    without inductor): the graph engine's decode step traces with no graph break and no recompile per token
    (the pass is counted on the device, not in Python), and the tokens and counters stay right."""
    # on CUDA, test_the_whole_decode_step_is_compiled_into_one_graph checks it against the compiled full GPU
    if device != "cpu":
        pytest.skip("the CPU check of the tracing (eager backend)")
    from torch._dynamo.utils import counters

    ref = tiny_model("olmoe", num_hidden_layers=3).to(device)
    ref.set_experts_implementation("batched_mm")  # what generate decodes with on a GPU: the device path
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0)).to(device)
    want = generate(ref, ids, 10)
    specmd.offload(ref, "50%", "lru", device, engine="graph", prefetch=prefetch, lookahead=2)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        got = ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, **compiled_generate)
        assert torch.equal(got, want)
    assert not counters["graph_break"] and counters["frames"]["ok"] == 1  # one frame, traced once
    assert ref.specmd.stats().forward_passes == 20
    assert (ref.specmd.stats().total.prefetches > 0) == (prefetch != "none")
    ref.specmd.close()


def test_generate_gets_a_static_cache_where_one_step_fits_and_the_user_chose_none(caplog):
    """What offload does on CUDA (api._capture_decode), called here on a CPU-offloaded model: a static cache
    (so generate compiles the decode step) only where one token's routed experts fit the pool, never over
    the user's choice; below, one logged line names the budget that would allow it."""
    from specmd.api import _capture_decode

    model = specmd.offload(tiny_model("olmoe"), 1 * _expert_bytes(), "lru", "cpu", engine="graph")
    top_k = model.config.num_experts_per_tok
    with caplog.at_level("WARNING"):
        assert not _capture_decode(model, model.specmd.engine, top_k)  # one slot, top-2
    assert model.generation_config.cache_implementation is None
    assert any(f"at least {top_k} experts" in r.getMessage() for r in caplog.records)
    model.specmd.close()
    specmd.offload(model, "50%", "lru", "cpu", engine="graph")
    assert _capture_decode(model, model.specmd.engine, top_k)
    assert model.generation_config.cache_implementation == "static"
    model.generation_config.cache_implementation = "dynamic"  # the user's choice stays
    assert not _capture_decode(model, model.specmd.engine, top_k)
    assert model.generation_config.cache_implementation == "dynamic"
    model.specmd.close()


def _expert_bytes():
    return find_moe_layers(tiny_model("olmoe"))[0].layout.expert_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="layer steps are captured as CUDA graphs on CUDA only")
def test_a_new_replay_drops_the_layer_graphs_that_read_the_old_one():
    """A captured layer step reads the replay's tensors (its pass counter, its candidates) at the addresses
    they had when captured: a new replay must not run under those graphs. Under replay the counts depend on
    the trace alone, so two replays in a row on CUDA (captured steps) count what they count on the CPU (no
    graphs)."""
    from test_replay import recorded_trace

    shape = dict(num_hidden_layers=3, num_experts=8)
    trace = recorded_trace(tiny_model("olmoe", seed=1, **shape), 1, "cpu")
    counts = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("olmoe", seed=2, **shape).to(device)
        model.set_experts_implementation("batched_mm")  # the device path on the CPU too
        expert = find_moe_layers(model)[0].layout.expert_bytes
        specmd.offload(model, 4 * expert, "lru", device, engine="graph", prefetch="topk")
        for replay in range(2):
            model.specmd.replay_routing(trace)
            assert model.specmd.engine.captured_graphs == 0  # none kept from the last replay
            model.specmd.reset_stats()
            for (tokens, decode), seed in zip(trace.prompts, range(9)):
                ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
                model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False,
                               disable_compile=True)
            counts[device, replay] = [vars(s) for s in model.specmd.stats().layers]
        if device == "cuda":
            assert model.specmd.engine.captured_graphs > 0
        model.specmd.close()
    assert counts["cuda", 0] == counts["cpu", 0] and counts["cuda", 1] == counts["cpu", 1]
    assert sum(layer["prefetches"] for layer in counts["cpu", 1]) > 0
