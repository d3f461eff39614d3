"""The watchdog thread against the main loop: a randomized stress test with an independent checker,
and errors raised inside the thread."""
import random
import threading
import time

import pytest
import torch

import specmd
import specmd.api
import specmd.runtime.compute as compute
import specmd.runtime.engines.watchdog as watchdog
from specmd.runtime.adapters import find_moe_layers
from specmd.runtime.copier import make_copier
from specmd.runtime.prefetch import PrefetchConfig
from specmd.tiny import tiny_model


class SlotChecker:
    """Watches a cache from outside: every slot read by a computation must hold, from the acquire that
    handed it out to the release after the compute, the same copy generation and the right expert's bytes;
    no copy may land in a slot that is handed out. Installed through the copier factory (every copy) and
    the cache's acquire/release."""

    def __init__(self):
        self.violations = []
        self.reads = 0
        self._lock = threading.Lock()
        self._held = {}  # slot -> (key, generation)
        self._generation = {}  # slot -> number of copies into it

    def make_copier(self, store, pool, device, max_inflight):
        copier = make_copier(store, pool, device, max_inflight)
        copy = copier.copy

        def checked_copy(slot, key, demand):
            with self._lock:
                self._generation[slot] = self._generation.get(slot, 0) + 1
                if slot in self._held:
                    self.violations.append(f"copy of {key} into slot {slot} held by {self._held[slot]}")
            copy(slot, key, demand)

        copier.copy = checked_copy
        return copier

    def watch(self, handle):
        cache, pool, store = handle.engine.cache, handle.engine.pool, handle.store
        acquire, release = cache.acquire, cache.release

        def content_ok(slot, key):
            return torch.equal(pool.data[slot].cpu(), store.block(*key))

        def checked_acquire(layer, experts):
            slots = acquire(layer, experts)
            with self._lock:
                for expert, slot in zip(experts, slots):
                    key = (layer, expert)
                    if slot in self._held:
                        self.violations.append(f"slot {slot} handed out twice")
                    self._held[slot] = (key, self._generation.get(slot))
                    if not content_ok(slot, key):
                        self.violations.append(f"slot {slot} does not hold {key} at acquire")
            return slots

        def checked_release(slots):
            with self._lock:
                for slot in slots:
                    key, generation = self._held.pop(slot)
                    self.reads += 1
                    if self._generation.get(slot) != generation:
                        self.violations.append(f"slot {slot} ({key}) overwritten between acquire and release")
                    elif not content_ok(slot, key):
                        self.violations.append(f"slot {slot} ({key}) changed under its reader")
            release(slots)

        cache.acquire, cache.release = checked_acquire, checked_release


@pytest.fixture
def slow_compute(monkeypatch):
    """Stretch each expert computation by 0-2 ms so the watchdog's copies interleave with it."""
    real = compute.expert_rows
    rng = random.Random(0)

    def slow(*args, **kwargs):
        time.sleep(rng.random() * 0.002)
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "expert_rows", slow)


FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"]


@pytest.mark.parametrize("seed", range(24))
def test_stress_random_configurations(seed, slow_compute, monkeypatch, device):
    rng = random.Random(seed)
    family = rng.choice(FAMILIES)
    model = tiny_model(family, seed=seed).to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    batch, length = rng.randint(1, 3), rng.randint(1, 20)
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    budget = rng.choice([expert, 2 * expert, 3 * expert, 0.25, 0.5])
    eviction = rng.choice(sorted(specmd.POLICIES))
    prefetch = rng.choice(["topk", "top-p", "threshold"])
    checker = SlotChecker()
    monkeypatch.setattr(specmd.api, "make_copier", checker.make_copier)
    specmd.offload(model, budget, eviction, device, prefetch=prefetch, lookahead=rng.randint(1, 3), seed=seed)
    checker.watch(model.specmd)
    got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    model.specmd.close()
    assert checker.violations == []
    assert checker.reads > 0
    assert torch.equal(got, want), (family, budget, eviction, prefetch)


def specmd_threads():
    return [t for t in threading.enumerate() if t.name == "specmd-watchdog"]


def test_watchdog_error_surfaces_in_the_model_thread_and_close_joins(device):
    # One prefetch in flight at a time over a slow link: on CUDA the model's thread issues only what
    # fits, so the watchdog gets the rest (on a CPU it gets every copy).
    config = PrefetchConfig(policy="topk", max_inflight=1)
    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device, prefetch=config)
    engine = model.specmd.engine
    if device != "cpu":
        model.specmd.emulate_link(2_000_000)
    real_submit = engine.cache.submit_prefetches

    def broken_copy(requests, copy=True):
        if threading.current_thread().name == "specmd-watchdog":
            raise OSError("simulated copy failure")
        return real_submit(requests, copy)

    engine.cache.submit_prefetches = broken_copy  # the watchdog submits every request it takes
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0)).to(device)
    with pytest.raises(RuntimeError, match="simulated copy failure"):
        for _ in range(3):
            model.generate(ids, max_new_tokens=4, do_sample=False)
            # On a fast device the generate can end before the thread gets to its first request.
            engine.watchdog.wait_idle()
    assert isinstance(engine.watchdog.error, OSError)  # kept; the thread stops itself after a failure
    model.specmd.close()
    assert specmd_threads() == []


def test_close_stops_the_thread_and_frees_the_slots(device):
    before = len(specmd_threads())
    model = specmd.offload(tiny_model("mixtral"), "25%", device=device, prefetch="topk", lookahead=2)
    assert len(specmd_threads()) == before + 1
    model.generate(torch.tensor([[5, 6, 7]]).to(device), max_new_tokens=3, do_sample=False)
    model.specmd.close()
    assert len(specmd_threads()) == before
    assert model.specmd.engine.pool.data.numel() == 0


def test_a_failure_outside_the_copy_still_surfaces(monkeypatch, device):
    """Any exception in the thread (here: its queue) reaches the model's thread, not just copy errors."""
    def broken_order(requests):
        raise RuntimeError("queue corrupted")

    monkeypatch.setattr(watchdog, "nearest_first", broken_order)
    model = specmd.offload(tiny_model("olmoe"), "50%", "lru", device,
                           prefetch=PrefetchConfig(policy="topk", max_inflight=1))
    if device != "cpu":  # copies stay in flight, so requests queue for the thread (see above)
        model.specmd.emulate_link(2_000_000)
    with pytest.raises(RuntimeError, match="queue corrupted"):
        for _ in range(3):
            model.generate(torch.tensor([[5, 6, 7]]).to(device), max_new_tokens=4, do_sample=False)
    model.specmd.close()
    assert specmd_threads() == []


def test_generate_on_another_stream_waits_for_the_copies(device):
    """Slots are waited on by the stream the model runs on at each layer, not the one current at
    offload: a generate under a side stream (after one on the default stream) still reads complete
    copies, across a slow emulated link."""
    if device == "cpu":
        pytest.skip("streams exist only on CUDA")
    model = tiny_model("olmoe").to(device)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0)).to(device)
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    with specmd.offload(model, 3 * expert, "lru", device, prefetch="topk").specmd as handle:
        handle.emulate_link(2_000_000)  # ~1 ms per copy: reads would race a missing wait
        assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        side.synchronize()
        assert torch.equal(got, want)
