"""The graph engine's schedule over a routing trace: its own device cache (``runtime/device_cache.py``, the
torch calls, on the CPU) driven call by call as ``GraphEngine.run_layer`` drives it under replay, so the
counts are the live engine's (``sim.simulate`` runs the threaded engine's schedule instead).

What differs from the threaded schedule: a decode step's layer is one cache call (its distinct experts
resident at once), then one prefetch call per looked-ahead layer *of the same pass* (the graph engine does
not predict the next pass's first layers); a prefill's layer is one call when its experts fit the pool
(the device prefill), else the main loop's chunks; prefetch candidates exist for decode steps only.

With ``timing`` the graph cost model (``GraphTiming``) estimates TTFT and TPOT. An estimate: compare it with
a live replay of the same trace (``benchmarks/sim_vs_live.py``) before trusting it.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

import torch

from ..runtime.compute import GROUPED_MM_MAX_GROUPS
from ..runtime.device_cache import COUNTERS, DeviceCache
from ..runtime.engines.mainloop import MainLoop
from ..runtime.metrics import Stats
from .costmodel import GraphLink, ModelTiming
from .replay import DeviceRoutingReplay
from .trace import RoutingTrace

GRAPH_PREFETCH = ("none", "topk", "perfect")
_MISSES = [COUNTERS.index(c) for c in ("misses_cold", "misses_capacity", "misses_collision")]
_PREFETCHES = COUNTERS.index("prefetches")


@dataclass(frozen=True)
class GraphTiming:
    """The graph engine's step, per MoE layer: the demand copies (``link.gather_gbps``), then the layer's
    compute (``model.layer_ms``) beside the prefetch copies it forked (``link.prefetch_gbps``), which the next
    layer's cache call joins; plus ``link.overhead_ms``. A link-bound step is priced by its bytes: every
    wasted prefetch costs a whole copy, overlapped or not."""

    link: GraphLink
    model: ModelTiming

    def copy_ms(self, experts: int, gbps: float) -> float:
        return experts * self.model.expert_bytes / (gbps * 1e9) * 1e3

    def layer(self, tokens: int, demand: int, prefetched: int) -> float:
        """Milliseconds of one layer's call of ``tokens`` tokens that copied ``demand`` experts and forked
        ``prefetched``."""
        overlapped = max(self.model.layer_ms(tokens), self.copy_ms(prefetched, self.link.prefetch_gbps))
        return self.copy_ms(demand, self.link.gather_gbps) + overlapped + self.link.overhead_ms


def simulate_graph(trace: RoutingTrace, capacity: int, eviction: str, prefetch: str = "none", lookahead: int = 1,
                   k: int | None = None, warm: bool = False, prefill_kernel: str = "grouped",
                   grouped_max_slots: int | None = GROUPED_MM_MAX_GROUPS,
                   timing: GraphTiming | None = None) -> Stats:
    """Replay ``trace`` through the graph engine's device cache of ``capacity`` slots with ``eviction`` (a
    device policy). ``prefetch``: ``topk`` the first ``k`` (default top-k) candidates the trace recorded for
    the next ``lookahead`` layers of the pass, ``perfect`` the ids they route to. ``warm``: replay the trace
    once uncounted first, as ``graph_h100.py`` warms up before its timed replay (``rewind_replay``).
    ``prefill_kernel``: ``grouped`` (CUDA's default: the device prefill when the pool has at most
    ``grouped_max_slots`` slots, None: no limit, as on the CPU) or ``batched`` (a device step, as decode).
    Counts in experts (``expert_bytes`` 1); with ``timing`` also ``estimated_ttft_ms`` and
    ``estimated_tpot_ms`` (means over prefill and decode passes)."""
    if prefetch not in GRAPH_PREFETCH:
        raise ValueError(f"unknown graph-schedule prefetch {prefetch!r}; choose one of: {', '.join(GRAPH_PREFETCH)}")
    if prefetch == "topk" and trace.predicted is None:
        raise ValueError(f"{trace.source} holds routed ids only: topk prefetch needs a trace with the predictor's "
                         "candidates (record one with 'specmd trace'), or use prefetch='perfect'")
    if prefill_kernel not in ("grouped", "batched"):
        raise ValueError(f"prefill_kernel={prefill_kernel!r}: choose 'grouped' or 'batched'")
    L, E, top_k = trace.num_layers, trace.num_experts, trace.top_k
    k = k or top_k
    cache = DeviceCache(L, E, capacity, eviction, torch.device("cpu"))  # ValueError names the device policies
    loop = MainLoop(cache, L, submit=lambda requests: None)
    replay = DeviceRoutingReplay(trace, L, top_k, torch.device("cpu"))
    depth = min(lookahead, L)
    if prefetch == "topk":
        replay.replay_candidates(depth, k)
    decode_passes = set(replay.decode_passes)
    grouped_fits = grouped_max_slots is None or capacity <= grouped_max_slots
    prefill_ms, decode_ms = [], []
    for round in range(2 if warm else 1):
        if round:
            cache.reset_counters()
            prefill_ms, decode_ms = [], []
        replay.rewind()
        for p, layers in enumerate(trace.passes):
            replay.begin_pass()
            tokens = len(layers[0]) // top_k
            decode = p in decode_passes
            elapsed = 0.0
            for layer, ids in enumerate(layers):
                loop.enter(layer)
                before = cache.counters.sum(1).tolist() if timing else None  # prefetches count at their target layer
                fits = min(E, tokens * top_k) <= capacity
                if fits and (decode or prefill_kernel == "batched"):
                    targets = [layer + d for d in range(1, depth + 1) if layer + d < L] if prefetch != "none" else []
                    predicted = _predictions(replay, trace, prefetch, p, layer, targets, decode, k)
                    cache.step(layer, torch.tensor(ids), predicted=predicted, targets=targets if predicted is not None
                               else ())
                elif fits and not decode and grouped_fits:  # the device prefill
                    cache.step(layer, torch.tensor(ids))
                else:
                    loop.run(layer, sorted(set(ids)), [], lambda chunk, slots: None)
                if timing:
                    after = cache.counters.sum(1).tolist()
                    demand = sum(after[i] - before[i] for i in _MISSES)
                    elapsed += timing.layer(tokens, demand, after[_PREFETCHES] - before[_PREFETCHES])
            if timing:
                (decode_ms if decode else prefill_ms).append(elapsed)
    stats = Stats(num_slots=capacity, budget_bytes=capacity, expert_bytes=1, forward_passes=int(cache.passes),
                  layers=cache.stats(1), prefetch_outcomes_counted=False)
    if timing:
        stats.estimated_ttft_ms = mean(prefill_ms) if prefill_ms else None
        stats.estimated_tpot_ms = mean(decode_ms) if decode_ms else 0.0
    return stats


def _predictions(replay: DeviceRoutingReplay, trace: RoutingTrace, prefetch: str, p: int, layer: int,
                 targets: list[int], decode: bool, k: int) -> torch.Tensor | None:
    """[D, C] what the engine's ``_predictions`` hands the cache call (-1: none), or None without targets."""
    if not targets:
        return None
    if prefetch == "topk":
        return replay.step_candidates(layer)[:len(targets)]
    predicted = torch.full((len(targets), k), -1, dtype=torch.int64)
    if decode:  # perfect: the ids the looked-ahead layers of this pass route to
        for row, target in enumerate(targets):
            ids = sorted(set(trace.passes[p][target]))[:k]
            predicted[row, :len(ids)] = torch.tensor(ids)
    return predicted
