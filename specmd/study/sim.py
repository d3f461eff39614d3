"""Trace-driven simulation of the expert cache: the live ``SlotCache``, policy objects and main loop
(``runtime/engines/mainloop.py``), driven by a routing trace instead of a model, so hit, miss, collision and
eviction counts mean exactly what they mean in a live run.

The cache is given a copier that copies nothing (each copy only advances the cost model's clock) and slots
of one byte each, so a budget is counted in experts.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from statistics import mean

from ..runtime.cache import SlotCache
from ..runtime.copier import Copier, Key
from ..runtime.engines.mainloop import MainLoop
from ..runtime.metrics import LayerStats, Stats
from ..runtime.policies import POLICIES, Belady, EvictionPolicy, make_policy
from ..runtime.prefetch import prefetch_requests
from .costmodel import LinkProfile, ModelTiming, Timeline
from .trace import RoutingTrace

SIM_POLICIES = tuple(sorted(POLICIES)) + ("belady",)
SIM_PREFETCH = ("none", "topk", "perfect")


class _TimelineCopier(Copier):
    """Copies nothing; with a timeline, each copy and each chunk's compute advance the cost model's clocks,
    and the compute stream's waits come back through ``drain`` as the live copier's do."""

    def __init__(self, timeline: Timeline | None) -> None:
        self.timeline = timeline
        self._drained_busy = 0.0
        self._stalls: dict[int, float] = {}

    def copy(self, slot: int, key: Key, demand: bool) -> None:
        if self.timeline is not None:
            self.timeline.load(key, prefetch=not demand)

    def compute(self, layer: int, keys: list[Key], ms: float, host_ms: float = 0.0) -> None:
        self._stalls[layer] = self._stalls.get(layer, 0.0) + self.timeline.compute(keys, ms, host_ms)

    def drain(self, block: bool) -> tuple[float, dict[int, float]]:
        busy = self.timeline.copy_busy_ms if self.timeline is not None else 0.0
        drained = busy - self._drained_busy, self._stalls
        self._drained_busy, self._stalls = busy, {}
        return drained


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


def _predicted(trace: RoutingTrace, accesses: list, prefetch: str, k: int, lookahead: int, p: int,
               layer: int) -> list[tuple[int, list[int]]]:
    """(target layer, ids) of each looked-ahead layer, nearest first: ``topk`` the first ``k`` candidates the
    trace recorded; ``perfect`` the ids the target layer really routes to (a bound for ids-only traces)."""
    num_layers = trace.num_layers
    depth = min(lookahead, num_layers)
    recorded = trace.candidates(p, layer, depth, k) if prefetch == "topk" else None
    predicted = []
    for distance in range(1, depth + 1):
        if recorded is not None:
            ids = recorded[distance - 1]
        else:
            target_pass, target_layer = divmod(p * num_layers + layer + distance, num_layers)
            ids = accesses[target_pass][target_layer] if target_pass < len(accesses) else []
        predicted.append(((layer + distance) % num_layers, ids))
    return predicted


def _check(trace: RoutingTrace, capacity: int, eviction: str, prefetch: str, lookahead: int) -> None:
    if eviction not in SIM_POLICIES:
        raise ValueError(f"unknown eviction policy {eviction!r}; choose one of: {', '.join(SIM_POLICIES)}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: the cache needs at least one expert")
    if prefetch not in SIM_PREFETCH:
        raise ValueError(f"unknown simulator prefetch {prefetch!r}; choose one of: {', '.join(SIM_PREFETCH)}")
    if prefetch == "topk" and trace.predicted is None:
        raise ValueError(f"{trace.source}: an ids-only trace has no predictions; use prefetch='perfect' or 'none'")
    if prefetch != "none" and not 1 <= lookahead <= 3:
        raise ValueError(f"lookahead={lookahead}: prefetch looks 1, 2 or 3 layers ahead")
    if prefetch == "topk" and lookahead > trace.lookahead:
        raise ValueError(f"lookahead={lookahead}: {trace.source} recorded predictions {trace.lookahead} layers "
                         f"ahead at most; pass --lookahead 1..{trace.lookahead}, or record with a larger lookahead")


def simulate(trace: RoutingTrace, capacity: int, eviction: str, seed: int = 0, prefetch: str = "none",
             lookahead: int = 1, k: int | None = None,
             timing: tuple[LinkProfile, ModelTiming] | None = None, warm: bool = False) -> Stats:
    """Replay ``trace`` through a cache of ``capacity`` experts with ``eviction`` (any of ``SIM_POLICIES``).

    The schedule is the engine's own main loop: layers in order, each layer's distinct experts in ascending
    id order, held while the layer runs, in chunks when a layer needs more than ``capacity``; prefetches as
    the engine's inline mode, submitted after a layer's first chunk: ``topk`` takes the first ``k`` (default
    top-k) candidates the trace recorded for the next ``lookahead`` layers; ``perfect`` the ids those layers
    really route to. With ``timing`` (a link profile and a model's timing) the cost model
    (``costmodel.Timeline``; a profile's host time per layer beside its copies when it carries one, and its
    prefetch terms: host time per looked-ahead router and per prefetch copy, prefetch copies after the
    layer) also estimates TTFT (mean prefill pass), TPOT (mean decode pass), per-layer stall and copy-engine
    busy time. ``warm``: replay the trace once uncounted first, as a live bench row warms
    up with a whole replay before its counted one (``rewind_replay``), so the counted replay starts from the
    cache the first one left.
    """
    _check(trace, capacity, eviction, prefetch, lookahead)
    if warm and eviction == "belady":
        raise ValueError("warm replays the trace twice, and Belady's oracle knows one replay's future: simulate "
                         "belady without warm")
    k = k or trace.top_k
    policy: EvictionPolicy = _oracle(trace) if eviction == "belady" else make_policy(eviction, seed)
    layer_stats = [LayerStats() for _ in range(trace.num_layers)]
    capacity = min(capacity, trace.num_layers * trace.num_experts)
    copier = _TimelineCopier(Timeline(*timing) if timing else None)
    timeline = copier.timeline
    cache = SlotCache(copier, capacity, 1, capacity, policy, layer_stats)
    loop = MainLoop(cache, trace.num_layers, cache.submit_prefetches)
    accesses = trace.accesses()
    prefill_ms, decode_ms = [], []
    for counted in ([False, True] if warm else [True]):
        if counted and warm:  # what the engine's reset_stats forgets before the counted replay
            cache.reset_timings()
            layer_stats[:] = [LayerStats() for _ in layer_stats]
            loop.clock.forward_passes = 0
            prefill_ms, decode_ms = [], []
        for p, layers in enumerate(accesses):
            tokens = len(trace.passes[p][0]) // trace.top_k
            pass_start = timeline.now if timeline else 0.0
            for layer, experts in enumerate(layers):
                position, _ = loop.enter(layer)
                loop.start(layer, position)
                if isinstance(policy, Belady):
                    policy.set_now(p * trace.num_layers + layer)
                requests = [] if prefetch == "none" else prefetch_requests(
                    position, _predicted(trace, accesses, prefetch, k, lookahead, p, layer))

                def compute(chunk: Sequence[int], slots: list[int], layer=layer, experts=experts) -> None:
                    if timeline is not None:
                        share = len(chunk) / len(experts)
                        ms, host_ms = timeline.link.layer_ms(timeline.model, tokens)
                        if prefetch == "topk":  # the live predictor scores the next layers' routers
                            host_ms += timeline.link.host_predict_ms * lookahead
                        copier.compute(layer, [(layer, e) for e in chunk], share * ms, share * host_ms)

                loop.run(layer, experts, requests, compute)
            if timeline is not None:
                (prefill_ms if tokens > 1 else decode_ms).append(timeline.now - pass_start)
    cache.drain_timings()
    stats = Stats(num_slots=capacity, budget_bytes=capacity, expert_bytes=1, forward_passes=loop.clock.forward_passes,
                  copy_busy_ms=cache.copy_busy_ms, layers=layer_stats)
    if timeline is not None:
        stats.estimated_ttft_ms = mean(prefill_ms) if prefill_ms else None
        stats.estimated_tpot_ms = mean(decode_ms) if decode_ms else 0.0
    return stats
