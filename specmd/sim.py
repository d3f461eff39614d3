"""Trace-driven simulation of the expert cache: the live ``SlotCache`` and policy objects, driven by a
routing trace instead of a model, so hit, miss, collision and eviction counts mean exactly what they
mean in a live run.

The slots hold one byte each (a synthetic store), so a budget is counted in experts.
"""
from __future__ import annotations

import bisect
from collections import defaultdict

import torch

from statistics import mean

from .adapters import ExpertLayout
from .cache import SlotCache
from .costmodel import LinkProfile, ModelTiming, Timeline
from .metrics import LayerStats, Stats
from .policies import POLICIES, Belady, EvictionPolicy, make_policy
from .trace import RoutingTrace

SIM_POLICIES = tuple(sorted(POLICIES)) + ("belady",)


class _SyntheticStore:
    """One byte per expert: the simulator counts copies, it does not move weights. The cache asks for a
    block exactly once per copy, which is where the cost model learns of each copy."""

    def __init__(self, timeline: Timeline | None) -> None:
        self._byte = torch.zeros(1, dtype=torch.uint8)
        self._timeline = timeline

    def block(self, layer: int, expert: int) -> torch.Tensor:
        if self._timeline is not None:
            self._timeline.load((layer, expert))
        return self._byte


def _oracle(trace: RoutingTrace) -> Belady:
    accesses: dict[tuple[int, int], list[int]] = defaultdict(list)
    for p, layers in enumerate(trace.accesses()):
        for layer, experts in enumerate(layers):
            for expert in experts:
                accesses[(layer, expert)].append(p * trace.num_layers + layer)

    def next_access(key, now):
        times = accesses.get(key, ())
        i = bisect.bisect_left(times, now)
        return times[i] if i < len(times) else float("inf")

    return Belady(next_access)


SIM_PREFETCH = ("none", "topk", "perfect")


def _prefetch_ids(trace: RoutingTrace, accesses: list, prefetch: str, k: int, p: int, layer: int,
                  distance: int) -> list[int]:
    if prefetch == "topk":
        return trace.predicted[p][layer][distance - 1][:k]
    # perfect: the experts the target layer will really route to (a bound for ids-only traces)
    target_pass, target_layer = divmod(p * trace.num_layers + layer + distance, trace.num_layers)
    return accesses[target_pass][target_layer] if target_pass < len(accesses) else []


def simulate(trace: RoutingTrace, capacity: int, eviction: str, seed: int = 0, prefetch: str = "none",
             lookahead: int = 1, k: int | None = None,
             timing: tuple[LinkProfile, ModelTiming] | None = None) -> Stats:
    """Replay ``trace`` through a cache of ``capacity`` experts with ``eviction`` (any of ``SIM_POLICIES``).

    The pass structure is the engine's: layers in order, each layer's distinct experts in ascending id
    order, pinned while the layer runs, in chunks when a layer needs more than ``capacity``. Prefetch as
    the engine's inline mode: after a layer's first chunk is resident, the predictions for the next
    ``lookahead`` layers, nearest first: ``topk`` takes the first ``k`` (default top-k) candidates the
    trace recorded; ``perfect`` the ids the target layer really routes to. With ``timing`` (a link
    profile and a model's timing) the cost model (``costmodel.Timeline``) also estimates TTFT (mean
    prefill pass), TPOT (mean decode pass), per-layer stall and copy-engine busy time.
    """
    if eviction not in SIM_POLICIES:
        raise ValueError(f"unknown eviction policy {eviction!r}; choose one of: {', '.join(SIM_POLICIES)}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: the cache needs at least one expert")
    if prefetch not in SIM_PREFETCH:
        raise ValueError(f"unknown simulator prefetch {prefetch!r}; choose one of: {', '.join(SIM_PREFETCH)}")
    if prefetch == "topk" and trace.predicted is None:
        raise ValueError(f"{trace.source}: an ids-only trace has no predictions; use prefetch='perfect' or 'none'")
    k = k or trace.top_k
    policy: EvictionPolicy = _oracle(trace) if eviction == "belady" else make_policy(eviction, seed)
    layout = ExpertLayout(names=("expert",), shapes=((1,),), offsets=(0,), block_numel=1,
                          num_experts=trace.num_experts, dtype=torch.uint8, is_transposed=False, has_bias=False)
    layer_stats = [LayerStats() for _ in range(trace.num_layers)]
    capacity = min(capacity, trace.num_layers * trace.num_experts)
    timeline = Timeline(*timing) if timing else None
    cache = SlotCache(_SyntheticStore(timeline), layout, capacity, capacity, policy, torch.device("cpu"), layer_stats)
    num_layers = trace.num_layers
    accesses = trace.accesses()
    prefill_ms, decode_ms = [], []
    for p, layers in enumerate(accesses):
        tokens = len(trace.passes[p][0]) // trace.top_k
        pass_start = timeline.now if timeline else 0.0
        cache.begin_pass()
        for layer, experts in enumerate(layers):
            position = (p + 1) * num_layers + layer  # as the engine numbers it
            cache.set_position(position, layer, num_layers)
            if isinstance(policy, Belady):
                policy.set_now(p * num_layers + layer)
            for start in range(0, len(experts), capacity):
                slots = cache.acquire(layer, experts[start:start + capacity])
                if start == 0 and prefetch != "none":
                    for distance in range(1, min(lookahead, num_layers) + 1):
                        target = (layer + distance) % num_layers
                        for expert in _prefetch_ids(trace, accesses, prefetch, k, p, layer, distance):
                            cache.prefetch((target, expert), position + distance)
                if timeline is not None:
                    chunk = [(layer, e) for e in experts[start:start + capacity]]
                    share = len(chunk) / len(experts)
                    layer_stats[layer].stall_ms += timeline.compute(chunk, share * timeline.model.layer_ms(tokens))
                cache.release(slots)
        if timeline is not None:
            (prefill_ms if tokens > 1 else decode_ms).append(timeline.now - pass_start)
    stats = Stats(num_slots=capacity, budget_bytes=capacity, expert_bytes=1,
                  forward_passes=len(trace.passes), layers=layer_stats)
    if timeline is not None:
        stats.copy_busy_ms = timeline.copy_busy_ms
        stats.estimated_ttft_ms = mean(prefill_ms) if prefill_ms else None
        stats.estimated_tpot_ms = mean(decode_ms) if decode_ms else 0.0
    return stats
