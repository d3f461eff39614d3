"""The graph engine's schedule over a routing trace: its own device cache (``runtime/device_cache.py``, the
torch calls, on the CPU) driven call by call as ``GraphEngine.run_layer`` drives it under replay, so the
counts are the live engine's (``sim.simulate`` runs the threaded engine's schedule instead).

What differs from the threaded schedule: a call through the batched kernel (decode steps on CUDA) whose
experts fit the pool is one cache call (its distinct experts resident at once), then one prefetch call per
looked-ahead layer *of the same pass* (the graph engine does not predict the next pass's first layers); a
call through the grouped kernel (prefills on CUDA; every call on the CPU under ``grouped_mm``) is one call
without prefetch when its experts fit the pool (the device prefill; on CUDA only while the pool has at most
``GROUPED_MM_MAX_GROUPS`` slots); anything else runs the main loop's chunks. A replayed trace's candidates
exist for its one-token decode steps only.

With ``timing`` the graph cost model (``GraphTiming``) estimates TTFT and TPOT. An estimate: compare it with
a live replay of the same trace (``benchmarks/sim_vs_live.py``) before trusting it.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

import torch

from ..runtime.compute import GROUPED_MM_MAX_GROUPS, KernelPlan
from ..runtime.device_cache import COUNTERS, DeviceCache
from ..runtime.engines.graph import CallPath, call_path
from ..runtime.engines.mainloop import MainLoop
from ..runtime.metrics import Stats
from .costmodel import GraphLink, ModelTiming
from .replay import DeviceRoutingReplay
from .trace import RoutingTrace

GRAPH_PREFETCH = ("none", "topk", "perfect")
CUDA_KERNELS = KernelPlan.mirroring("grouped_mm", "cuda")  # what the benchmarks replay through
_MISSES = [COUNTERS.index(c) for c in ("misses_cold", "misses_capacity", "misses_collision")]
_PREFETCHES = COUNTERS.index("prefetches")


@dataclass(frozen=True)
class GraphTiming:
    """The graph engine's compiled step, per MoE layer: the demand copies (``link.gather_gbps``), then the
    layer's compute (``link.step_layer_ms``, else ``model.layer_ms``) beside the prefetch copies it forked on
    the side stream (``link.prefetch_gbps``), which the next layer's cache call joins; plus
    ``link.overhead_ms``. A link-bound step is priced by its bytes: every wasted prefetch costs a whole copy,
    overlapped or not. (Uncompiled steps run their prefetch calls on the model's stream, after the demand
    call: optimistic there.) A prefill's call (grouped or chunked; no prefetch): its copies at the same rate,
    then the link's prefill compute (``prefill_layer_ms`` and per token, + ``chunked_layer_ms`` chunked), or
    where the link has none, the step's formula."""

    link: GraphLink
    model: ModelTiming

    def __post_init__(self) -> None:
        self.link.check_model(self.model.name)

    def copy_ms(self, experts: int, gbps: float) -> float:
        return experts * self.model.expert_bytes / (gbps * 1e9) * 1e3

    def layer(self, tokens: int, demand: int, prefetched: int, path: CallPath = CallPath.STEP) -> float:
        """Milliseconds of one layer's call of ``tokens`` tokens on ``path`` that copied ``demand`` experts
        and forked ``prefetched``."""
        link = self.link
        copies = self.copy_ms(demand, link.gather_gbps)
        if path is not CallPath.STEP:
            if link.prefill_layer_ms is not None:
                chunked = link.chunked_layer_ms if path is CallPath.CHUNKED else 0.0
                return copies + link.prefill_layer_ms + tokens * link.prefill_token_ms + chunked
            return copies + self.model.layer_ms(tokens) + link.overhead_ms
        # a step of more tokens (a batch) adds the model's per-token time: the link's is the eager prefill's
        compute = self.model.layer_ms(tokens) if link.step_layer_ms is None else \
            link.step_layer_ms + (tokens - 1) * self.model.prefill_ms_per_token
        return copies + max(compute, self.copy_ms(prefetched, link.prefetch_gbps)) + link.overhead_ms


class GraphSchedule:
    """The graph engine's device cache of ``capacity`` slots with ``eviction`` (a device policy), replaying
    traces one after another on the same cache, as a live engine replays them (``replay``). ``prefetch``:
    ``topk`` the first ``k`` (default top-k) candidates a trace recorded for the next ``lookahead`` layers of
    the pass, ``perfect`` the ids they route to (the lowest ``k`` ids when they route more). ``kernels``: the
    engine's ``KernelPlan`` (default CUDA's under ``grouped_mm``: grouped prefills, batched decode steps);
    ``grouped_max_slots``: the pool above which a grouped call runs chunked (CUDA: ``GROUPED_MM_MAX_GROUPS``;
    None on the CPU). Counts in experts (``expert_bytes`` 1)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, capacity: int, eviction: str,
                 prefetch: str = "none", lookahead: int = 1, k: int | None = None, kernels: KernelPlan = CUDA_KERNELS,
                 grouped_max_slots: int | None = GROUPED_MM_MAX_GROUPS, timing: GraphTiming | None = None) -> None:
        if prefetch not in GRAPH_PREFETCH:
            raise ValueError(f"unknown graph-schedule prefetch {prefetch!r}; choose one of: "
                             f"{', '.join(GRAPH_PREFETCH)}")
        if not 1 <= lookahead <= 3:
            raise ValueError(f"lookahead={lookahead}: the graph engine looks 1 to 3 layers ahead")
        self.shape = (num_layers, num_experts, top_k)
        self.capacity, self.prefetch, self.k = capacity, prefetch, k or top_k
        self.depth = min(lookahead, num_layers)
        self.timing = timing
        self.cache = DeviceCache(num_layers, num_experts, capacity, eviction, torch.device("cpu"))  # names the policies
        self._loop = MainLoop(self.cache, num_layers, submit=lambda requests: None)
        self.kernels = kernels
        self._grouped_max_slots = grouped_max_slots

    def replay(self, trace: RoutingTrace) -> tuple[list[float], list[float]]:
        """Every pass of ``trace`` through the cache (changes state); returns the estimated milliseconds of its
        prefill passes and of its decode steps, pass by pass (empty without ``timing``)."""
        L, E, top_k = self.shape
        if (trace.num_layers, trace.num_experts, trace.top_k) != self.shape:
            raise ValueError(f"{trace.source}: {trace.num_layers} layers x {trace.num_experts} experts, top-"
                             f"{trace.top_k}; this schedule has {L} x {E}, top-{top_k}")
        if self.prefetch == "topk":
            if trace.predicted is None:
                raise ValueError(f"{trace.source} holds routed ids only: topk prefetch needs a trace with the "
                                 "predictor's candidates (record one with 'specmd trace'), or use prefetch='perfect'")
            if self.depth > trace.lookahead or self.k > len(trace.predicted[0][0][0]):
                raise ValueError(f"{trace.source} recorded {len(trace.predicted[0][0][0])} candidates up to "
                                 f"{trace.lookahead} layers ahead: ask for k and lookahead within them")
        cache, timing = self.cache, self.timing
        replay = DeviceRoutingReplay(trace, L, top_k, torch.device("cpu"))
        if self.prefetch == "topk":
            replay.replay_candidates(self.depth, self.k)
        decode_passes = set(replay.decode_passes)
        prefill_ms, decode_ms = [], []
        for p, layers in enumerate(trace.passes):
            replay.begin_pass()
            tokens = len(layers[0]) // top_k
            decode = p in decode_passes
            elapsed = 0.0
            for layer, ids in enumerate(layers):
                self._loop.enter(layer)
                before = cache.counters.sum(1).tolist() if timing else None  # prefetches count at their target layer
                kernel = self.kernels.decode if decode else self.kernels.prefill
                path = call_path(kernel, tokens * top_k, E, self.capacity, self._grouped_max_slots)
                if path is CallPath.STEP:  # GraphEngine._device_step
                    targets = [layer + d for d in range(1, self.depth + 1) if layer + d < L] \
                        if self.prefetch != "none" else []
                    predicted = _predictions(replay, trace, self.prefetch, p, layer, targets, decode, self.k)
                    cache.step(layer, torch.tensor(ids), predicted=predicted,
                               targets=targets if predicted is not None else ())
                elif path is CallPath.GROUPED:  # GraphEngine._device_grouped
                    cache.step(layer, torch.tensor(ids))
                else:
                    self._loop.run(layer, sorted(set(ids)), [], lambda chunk, slots: None)
                if timing:
                    after = cache.counters.sum(1).tolist()
                    demand = sum(after[i] - before[i] for i in _MISSES)
                    elapsed += timing.layer(tokens, demand, after[_PREFETCHES] - before[_PREFETCHES], path)
            if timing:
                (decode_ms if decode else prefill_ms).append(elapsed)
        return prefill_ms, decode_ms

    def reset_counters(self) -> None:
        """Zero the counts; the cache's contents stay (changes state), as ``reset_stats`` live."""
        self.cache.reset_counters()

    def stats(self) -> Stats:
        return Stats(num_slots=self.capacity, budget_bytes=self.capacity, expert_bytes=1,
                     forward_passes=int(self.cache.passes), layers=self.cache.stats(1),
                     prefetch_outcomes_counted=False)


def simulate_graph(trace: RoutingTrace, capacity: int, eviction: str, prefetch: str = "none", lookahead: int = 1,
                   k: int | None = None, warm: bool = False, kernels: KernelPlan = CUDA_KERNELS,
                   grouped_max_slots: int | None = GROUPED_MM_MAX_GROUPS,
                   timing: GraphTiming | None = None) -> Stats:
    """Replay ``trace`` through a ``GraphSchedule`` (the arguments are its own) and count it. ``warm``: replay
    the trace once uncounted first, as ``graph_h100.py`` warms up before its timed replay (``rewind_replay``).
    With ``timing`` also ``estimated_ttft_ms`` and ``estimated_tpot_ms`` (means over the counted replay's
    prefill and decode passes)."""
    schedule = GraphSchedule(trace.num_layers, trace.num_experts, trace.top_k, capacity, eviction, prefetch,
                             lookahead, k, kernels, grouped_max_slots, timing)
    if warm:
        schedule.replay(trace)
        schedule.reset_counters()
    prefill_ms, decode_ms = schedule.replay(trace)
    stats = schedule.stats()
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
