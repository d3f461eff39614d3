"""Token-identical greedy generation against the unpatched model, for every family, policy and budget."""
import pytest
import torch

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.tiny import TINY_CONFIGS, tiny_model

NEW_TOKENS = 24
# Budgets in units of one expert (int) or as fractions of all experts.
BUDGETS = [1, 2, 0.5, 1.0]


def generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def budget_bytes(model, budget):
    return budget * find_moe_layers(model)[0].layout.expert_bytes if isinstance(budget, int) else budget


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (saved checkpoint dir, reference tokens of the unpatched model)."""
    return {}


def reference(family, checkpoints, tmp_path_factory, prompt, device):
    if family not in checkpoints:
        model = tiny_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        model.to(device)
        with torch.inference_mode():
            checkpoints[family] = (path, generate(model, prompt.to(device)))
    return checkpoints[family]


def check_stats(model, budget):
    stats = model.specmd.stats()
    total = stats.total
    assert total.accesses == total.hits + total.misses > 0
    assert stats.num_slots * stats.expert_bytes <= stats.budget_bytes
    assert len(model.specmd.resident_experts()) <= stats.num_slots
    if isinstance(budget, float) and budget == 1.0:
        assert total.evictions == 0 and total.misses == total.misses_cold
    if isinstance(budget, int) and budget == 1:
        assert stats.num_slots == 1


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("loader", ["offload", "from_pretrained"])
def test_generation_is_token_identical(family, loader, checkpoints, tmp_path_factory, prompt, device):
    """Every budget x eviction policy. The model is built (or loaded) once per budget and offloaded again
    for each policy after closing: a re-offload reuses the host store, so each run starts from a cold
    cache over the same experts."""
    path, want = reference(family, checkpoints, tmp_path_factory, prompt, device)
    ids = prompt.to(device)
    model = tiny_model(family) if loader == "offload" else None
    for budget in BUDGETS:
        for eviction in sorted(specmd.POLICIES):
            nbytes = budget_bytes(model or tiny_model(family), budget)
            if model is None:
                model = specmd.from_pretrained(path, nbytes, eviction, device, dtype=torch.float32, progress=False)
            else:
                specmd.offload(model, nbytes, eviction, device)
            got = generate(model, ids)
            assert torch.equal(got, want), f"{family} {loader} budget={budget} eviction={eviction}"
            check_stats(model, budget)
            model.specmd.close()
        if loader == "from_pretrained":
            model = None


PREFETCH_BUDGETS = [1, 2, 0.25]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_prefetch_generation_is_token_identical(family, prompt, device):
    """Every eviction x prefetch policy x lookahead 1 and 3 at budgets of 1 expert, 2 experts and 25%:
    the watchdog thread prefetches while the model computes, and the tokens do not change."""
    model = tiny_model(family).to(device)
    ids = prompt.to(device)
    want = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    prefetched = 0
    for budget in PREFETCH_BUDGETS:
        for eviction in sorted(specmd.POLICIES):
            for prefetch in ["topk", "top-p", "threshold"]:  # "none": test_generation_is_token_identical
                for lookahead in [1, 3]:
                    specmd.offload(model, budget_bytes(model, budget), eviction, device,
                                   prefetch=prefetch, lookahead=lookahead)
                    got = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
                    assert torch.equal(got, want), f"{family} {budget} {eviction} {prefetch} d={lookahead}"
                    prefetched += model.specmd.stats().total.prefetches
                    model.specmd.close()
    assert prefetched > 0


GRAPH_BUDGETS = [1, 2, "top-k", 0.5]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_graph_engine_is_token_identical(family, checkpoints, tmp_path_factory, prompt, device):
    """The cache decided on the device, every device policy at 1 expert, 2 experts, top-k experts (what one
    decode step needs) and 50%: the unpatched model's tokens, and the threaded engine's counters."""
    from specmd.runtime.device_policies import DEVICE_POLICIES

    _, want = reference(family, checkpoints, tmp_path_factory, prompt, device)
    ids = prompt.to(device)
    model = tiny_model(family)
    top_k = model.config.num_experts_per_tok
    for budget in GRAPH_BUDGETS:
        nbytes = budget_bytes(model, top_k if budget == "top-k" else budget)
        for eviction in sorted(DEVICE_POLICIES):
            counts = []
            for engine in ("graph", "threaded"):
                specmd.offload(model, nbytes, eviction, device, engine=engine)
                got = generate(model, ids)
                assert torch.equal(got, want), f"{family} {engine} budget={budget} eviction={eviction}"
                total = model.specmd.stats().total
                counts.append((total.accesses, total.hits, total.misses_cold, total.misses_capacity,
                               total.misses_collision, total.evictions, total.bytes_copied))
                model.specmd.close()
            assert counts[0] == counts[1], f"{family} budget={budget} eviction={eviction}"
