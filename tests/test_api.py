"""The offload handle, statistics, chunking, and every bad input named in the core issue."""
import json
import threading

import pytest
import torch
from torch import nn

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.tiny import tiny_model


def expert_bytes(model):
    return find_moe_layers(model)[0].layout.expert_bytes


def run(model, device, tokens=12, batch=1, seed=0):
    ids = torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    return model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)


def test_experts_leave_the_device_and_the_rest_stays(device):
    model = specmd.offload(tiny_model("qwen2_moe"), "50%", "lru", device)
    for layer in find_moe_layers(model):
        assert all(p.device.type == "cpu" for p in layer.module.parameters())
    shared = model.model.layers[0].mlp.shared_expert
    assert all(p.device.type == torch.device(device).type for p in shared.parameters())
    assert model.model.layers[0].mlp.gate.weight.device.type == torch.device(device).type
    assert model.device.type == torch.device(device).type


def test_stats_count_and_serialise(device):
    model = specmd.offload(tiny_model("olmoe"), "100%", "lru", device)
    run(model, device)
    stats = model.specmd.stats()
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["total"]["misses"] == data["total"]["misses_cold"] > 0  # everything fits: cold misses only
    assert data["total"]["evictions"] == 0
    assert data["forward_passes"] == 4  # prefill + 3 decode steps (the 4th token needs no forward)
    assert len(data["layers"]) == 2
    assert data["total"]["bytes_copied"] == data["total"]["misses"] * stats.expert_bytes
    model.specmd.reset_stats()
    assert model.specmd.stats().total.accesses == 0
    run(model, device)
    assert model.specmd.stats().total.misses == 0  # warm cache, nothing copied


def test_one_slot_forces_chunking_and_collisions(device):
    model = tiny_model("olmoe")
    specmd.offload(model, expert_bytes(model), "lru", device)
    run(model, device, tokens=16)
    total = model.specmd.stats().total
    assert model.specmd.num_slots == 1
    assert total.misses_collision > 0 and total.evictions == total.misses - 1
    assert len(model.specmd.resident_experts()) == 1


def test_batched_prompts_match_unpatched(device):
    ref = tiny_model("mixtral").to(device)
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    model = specmd.offload(tiny_model("mixtral"), 3 * expert_bytes(ref), "least-stale", device)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(got, want)


def test_context_manager_and_closed_handle(device):
    model = specmd.offload(tiny_model("olmoe"), "50%", device=device)
    with model.specmd as handle:
        run(model, device)
        accesses = handle.stats().total.accesses
        assert accesses > 0
    assert handle.stats().total.accesses == accesses  # the figures of the block stay readable
    with pytest.raises(specmd.ClosedHandleError, match="offload"):
        handle.reset_stats()
    with pytest.raises(specmd.ClosedHandleError, match="offload"):
        run(model, device)
    model.specmd.close()  # twice is fine
    specmd.offload(model, "50%", device=device)  # a closed model can be offloaded again
    run(model, device)


def test_offload_twice_raises(device):
    model = specmd.offload(tiny_model("olmoe"), "50%", device=device)
    with pytest.raises(RuntimeError, match="close"):
        specmd.offload(model, "50%", device=device)


def test_budget_below_one_expert(device):
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match=f"at least {expert_bytes(model)} bytes"):
        specmd.offload(model, expert_bytes(model) - 1, device=device)
    with pytest.raises(ValueError, match="below one expert"):
        specmd.offload(model, "1%", device=device)  # 1% of 16 experts is 0.16 of one


@pytest.mark.parametrize("budget", ["plenty", "12 apples", -1, True])
def test_budget_not_a_size(budget, device):
    with pytest.raises(ValueError, match="600MB"):
        specmd.offload(tiny_model("olmoe"), budget, device=device)


def test_unknown_eviction_lists_the_valid_ones(device):
    with pytest.raises(ValueError) as err:
        specmd.offload(tiny_model("olmoe"), "50%", "most-recent", device)
    for name in specmd.POLICIES:
        assert name in str(err.value)


def test_unsupported_model_names_the_families():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(specmd.UnsupportedModelError, match="OLMoE.*Mixtral"):
        specmd.offload(Dense(), "50%", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="device='cpu'"):
        specmd.offload(tiny_model("olmoe"), "50%", device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        specmd.offload(tiny_model("olmoe"), "auto", device="cpu")


def test_offload_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="from_pretrained"):
        specmd.offload("not a model")


def test_the_default_budget_on_the_cpu_is_a_quarter_of_the_experts():
    model = specmd.offload(tiny_model("olmoe"), device="cpu")
    assert str(model.specmd.config.expert_budget) == "25%" and model.specmd.num_slots == 4  # of 16 experts
    model.specmd.close()


def test_summary_counts_prefetches(device):
    model = specmd.offload(tiny_model("olmoe"), "25%", device=device, prefetch={"policy": "topk", "inline": True})
    run(model, device)
    stats = model.specmd.stats()
    assert stats.total.prefetches > 0
    assert f"prefetches={stats.total.prefetches} evictions={stats.total.evictions}" in stats.summary()
    model.specmd.close()


def test_bad_input_leaves_the_model_untouched():
    model = tiny_model("olmoe")
    before = {n: p.device for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        specmd.offload(model, 1, device="cpu")
    assert not hasattr(model, "specmd")
    assert {n: p.device for n, p in model.named_parameters()} == before
    assert model.config._experts_implementation != "specmd"


def test_save_pretrained_after_offload_round_trips(tmp_path, device):
    model = specmd.offload(tiny_model("mixtral"), "25%", device=device)
    want = run(model, device)
    model.save_pretrained(tmp_path)
    reloaded = specmd.from_pretrained(tmp_path, "25%", device=device, dtype=torch.float32, progress=False)
    assert torch.equal(run(reloaded, device), want)


def test_a_watchdog_runs_only_for_threaded_prefetch(device):
    """Without prefetch (or with inline prefetch) no thread is started; threaded prefetch runs one watchdog,
    which close() joins."""
    def watchdogs():
        return [t for t in threading.enumerate() if t.name == "specmd-watchdog" and t.is_alive()]

    before = len(watchdogs())
    for prefetch in ["none", {"policy": "topk", "inline": True}]:
        model = specmd.offload(tiny_model("olmoe"), "50%", device=device, prefetch=prefetch)
        run(model, device)
        assert len(watchdogs()) == before, prefetch
        model.specmd.close()
    model = specmd.offload(tiny_model("olmoe"), "50%", device=device, prefetch="topk")
    run(model, device)
    assert len(watchdogs()) == before + 1
    model.specmd.close()
    assert len(watchdogs()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_budget_reads_free_device_memory():
    model = specmd.offload(tiny_model("olmoe"), "auto", device="cuda")
    stats = model.specmd.stats()
    assert stats.budget_bytes > 0 and stats.num_slots == 16  # a large card holds every tiny expert
    run(model, "cuda")
    assert model.specmd.engine.pool.data.is_cuda
    assert model.specmd.store.pin  # host experts are pinned when CUDA is present


def test_offload_under_inference_mode_then_generate_outside(device):
    with torch.inference_mode():
        model = specmd.offload(tiny_model("olmoe"), "25%", device=device, prefetch="topk")
    run(model, device)  # generate runs under no_grad only: slot copies must still be allowed
    assert model.specmd.stats().total.prefetches > 0
    model.specmd.close()


def test_offload_again_after_close_reuses_the_host_store(device):
    model = specmd.offload(tiny_model("olmoe"), "25%", "lru", device)
    want = run(model, device)
    buffers = [p.data_ptr() for layer in find_moe_layers(model) for p in layer.module.parameters()]
    model.specmd.close()
    specmd.offload(model, "50%", "least-stale", device, prefetch="topk")
    assert [p.data_ptr() for layer in find_moe_layers(model) for p in layer.module.parameters()] == buffers
    assert torch.equal(run(model, device), want)
    model.specmd.close()


def test_kernel_plan_mirrors_transformers():
    from specmd.runtime.compute import Kernel, KernelPlan

    assert KernelPlan.mirroring("grouped_mm", "cuda") == KernelPlan(Kernel.GROUPED, Kernel.BATCHED)
    assert KernelPlan.mirroring("grouped_mm", "cpu") == KernelPlan(Kernel.GROUPED, Kernel.GROUPED)
    assert KernelPlan.mirroring("batched_mm", "cpu") == KernelPlan(Kernel.BATCHED, Kernel.BATCHED)
    assert KernelPlan.mirroring("eager", "cuda") == KernelPlan(Kernel.LOOP, Kernel.LOOP)


def test_engine_knows_when_generate_decodes(device):
    """transformers switches grouped_mm to batched_mm for decode; the engine is told so it can follow."""
    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device)
    engine = model.specmd.engine
    seen = []
    original = engine.run_layer

    def spy(layer, *args):
        seen.append(engine.decoding)
        return original(layer, *args)

    engine.run_layer = spy
    run(model, device)  # prefill + 3 decode steps, 2 MoE layers each
    assert seen == [False] * 2 + [True] * 6
    model(torch.tensor([[5, 6, 7]], device=device))  # a plain forward is not a decode step
    assert seen[-2:] == [False, False]
    model.specmd.close()
    assert "_optimize_model_for_decode" not in vars(model)


@pytest.mark.parametrize("implementation", ["batched_mm", "eager"])
def test_other_experts_implementations_stay_identical(implementation, device):
    """Whatever kernel the unpatched model used, specmd uses its counterpart and matches it."""
    ref = tiny_model("olmoe").to(device)
    ref.set_experts_implementation(implementation)
    want = run(ref, device)
    model = tiny_model("olmoe")
    model.set_experts_implementation(implementation)
    specmd.offload(model, 2 * expert_bytes(model), "lru", device)
    assert model.specmd.implementation == implementation
    assert torch.equal(run(model, device), want)


def test_a_failure_mid_layer_leaves_no_slot_pinned(monkeypatch, device):
    import specmd.runtime.compute as compute
    from specmd.runtime.cache import SlotState

    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device)
    cache = model.specmd.engine.cache

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(compute, "expert_rows", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        run(model, device)
    assert SlotState.IN_USE not in cache.states()
    monkeypatch.undo()
    run(model, device)  # the cache is still usable


def test_offload_again_follows_an_implementation_set_after_close(device):
    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device)
    assert model.specmd.implementation == "grouped_mm"
    model.specmd.close()
    model.set_experts_implementation("eager")
    specmd.offload(model, "50%", "lru", device)
    assert model.specmd.implementation == "eager"
    model.specmd.close()
    specmd.offload(model, "50%", "lru", device)  # the config says "specmd" again: the last choice stays
    assert model.specmd.implementation == "eager"


def test_handle_does_not_keep_a_deleted_model_alive(device):
    import gc
    import weakref

    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device)
    model.specmd.close()
    handle = model.specmd
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    handle.close()  # still safe
