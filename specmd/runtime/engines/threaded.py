"""The threaded engine, the paper's design: a synchronous main loop after each router, a prefetch loop, and a
watchdog thread that issues the prefetch copies the main loop could not.

Per MoE layer, on the model's thread (streams and events: the protocol note in ``runtime/copier.py``):
  1. The predictor scores the current hidden state with the next ``d`` routers; the routed ids and the
     predicted ids reach the host in one ``.tolist()``: the one sync per layer.
  2. The layer starts (``MainLoop.start``) only after that sync: while the host waited (GIL released), the
     watchdog could still issue the copies predicted for this layer; from now on they are stale.
  3. ``MainLoop.run``: per chunk of at most ``num_slots`` experts, ``SlotCache.acquire`` counts hits and
     queues demand misses itself (never through the watchdog); after the first chunk the predictions go to
     ``SlotCache.submit_prefetches``, which issues those that fit under the in-flight bound at once (on
     CUDA) and returns the rest for the watchdog.
  4. The chunk is computed from the slots; ``SlotCache.release`` orders later overwrites after those reads.
Locks: ``SlotCache._lock`` guards the table, the policy, the counters and the copier; ``Watchdog._cond``
guards the watchdog's queue.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ..adapters import MoELayer
from ..cache import SlotCache
from ..compute import KernelPlan, sum_over_k, weighted_rows, weighted_rows_out
from ..copier import SlotPool
from ..metrics import LayerStats, Stats
from ..prefetch import Predictor, PrefetchRequest, prefetch_requests
from .binding import ClosedHandleError
from .mainloop import MainLoop
from .watchdog import Watchdog


class RoutingSource(Protocol):
    """Routed ids that replace the routers' (``study.replay.RoutingReplay``)."""

    def begin_pass(self) -> None: ...

    def ids(self, layer: int, num_tokens: int) -> list[int]: ...


class RoutingRecorder(Protocol):
    """Where each layer's routing is recorded (``study.recorder.TraceRecorder``)."""

    passes: list

    def begin_pass(self, num_tokens: int) -> None: ...

    def record(self, layer: int, ids: list[int], weights: torch.Tensor, hidden_states: torch.Tensor) -> None: ...


class ThreadedEngine:
    """Owns the cache, the predictor, the watchdog and the per-layer counters; called once per MoE layer
    per forward pass."""

    def __init__(self, layers: list[MoELayer], cache: SlotCache, pool: SlotPool, layer_stats: list[LayerStats],
                 predictor: Predictor, kernels: KernelPlan, copies_from_model_thread: bool) -> None:
        self.layers = layers
        self.kernels = kernels
        # Set by the model's generate while it decodes (api.track_decode), as transformers switches kernels.
        self.decoding = False
        self.cache = cache
        self.pool = pool
        self.predictor = predictor
        self._layer_stats = layer_stats  # shared with the cache, which counts into it
        self._predictions: dict[int, set[int]] = {}  # layer -> nearest prediction not yet checked
        config = predictor.config
        device = pool.data.device
        self.watchdog = Watchdog(cache, device) if config.enabled and not config.inline else None
        # Without a watchdog every copy is issued here; with one, only where a copy does not block (CUDA).
        self._copy_here = self.watchdog is None or copies_from_model_thread
        self.loop = MainLoop(cache, len(layers), self._submit)
        self.replay: RoutingSource | None = None  # set_replay (OffloadHandle.replay_routing)
        self.recorder: RoutingRecorder | None = None  # set by OffloadHandle.record_routing
        self.closed = False

    def set_replay(self, replay: RoutingSource | None) -> None:
        """Take every layer's routed ids from ``replay`` from the next forward pass on (None: the routers)."""
        self.replay = replay

    def run_layer(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """Compute one MoE layer's routed experts from the slot pool; syncs the host once (routed and
        predicted ids together).

        hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H], the same value (bit for bit in
        float32) as the module's own forward.
        """
        if self.closed:
            raise ClosedHandleError("this model's specmd handle was closed; call specmd.offload(model, ...) "
                                    "again to run it")
        if self.watchdog is not None:
            self.watchdog.raise_if_failed()
        position, new_pass = self.loop.enter(layer)
        if new_pass and self.replay is not None:
            self.replay.begin_pass()
        num_tokens, top_k = top_k_index.shape
        predicted = self.predictor.predict(layer, hidden_states)  # [D, C] or None
        if self.replay is not None:
            # The gate ran; its choice is replaced by the trace's (the host already knows these ids).
            replayed = self.replay.ids(layer, num_tokens)
            top_k_index = torch.tensor(replayed).view(num_tokens, top_k).to(hidden_states.device, non_blocking=True)
        flat_ids = top_k_index.reshape(-1)  # [T*k]
        replayed_predictions = predicted is not None and self.replay is not None and self.replay.has_predictions
        if predicted is None or replayed_predictions:  # the predictor ran (its cost is real); the trace's are used
            host_ids = replayed if self.replay is not None else flat_ids.tolist()  # the one sync of this layer
        else:
            host_ids = torch.cat([flat_ids, predicted.reshape(-1).to(flat_ids.dtype)]).tolist()  # the one sync
        routed = host_ids[:num_tokens * top_k]
        if self.recorder is not None:
            if new_pass:
                self.recorder.begin_pass(num_tokens)
            if self.recorder.passes:  # attached mid-pass: start at the next pass
                self.recorder.record(layer, routed, top_k_weights, hidden_states)
        self.loop.start(layer, position)
        counts = Counter(routed)
        self._score_prediction(layer, counts.keys())
        if replayed_predictions:
            targets = self.predictor.targets(layer)
            by_target = list(zip(targets, self.replay.predicted(layer, len(targets), self.predictor.candidates)))
        else:
            by_target = self._by_target(layer, host_ids[num_tokens * top_k:])
        requests = self._requests(position, by_target)
        return self._compute(layer, module, hidden_states, flat_ids, top_k_weights, counts, requests)

    def _compute(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, flat_ids: torch.Tensor,
                 top_k_weights: torch.Tensor, counts: Counter, requests: list[PrefetchRequest]) -> torch.Tensor:
        """Compute the layer's rows chunk by chunk from the slots (``MainLoop.run``). [T, H] out, no host sync."""
        num_tokens, top_k = top_k_weights.shape
        weights = top_k_weights.reshape(-1)  # [T*k]
        layout = self.pool.layout
        out = weighted_rows_out(layout, hidden_states, weights)  # [T*k, H]
        kernel = self.kernels.decode if self.decoding else self.kernels.prefill

        def compute_chunk(chunk: Sequence[int], slots: list[int]) -> None:
            weighted_rows(module, layout, self.pool.views, kernel, hidden_states, flat_ids, weights, counts, chunk,
                          slots, out)

        self.loop.run(layer, sorted(counts), requests, compute_chunk)
        return sum_over_k(out, num_tokens, top_k, hidden_states.dtype)

    def _submit(self, requests: list[PrefetchRequest]) -> None:
        # What cannot start now goes to the watchdog, even while it still holds older requests: with lookahead
        # 1 those are stale by now, and handing every request to the thread brings back its GIL cost.
        rest = self.cache.submit_prefetches(requests, copy=self._copy_here)
        if self.watchdog is not None:
            self.watchdog.submit(rest)

    def _score_prediction(self, layer: int, experts) -> None:
        """Compare the nearest prediction for ``layer`` with the distinct ``experts`` it routed to."""
        predicted = self._predictions.pop(layer, None)
        if predicted is not None:
            stats = self._layer_stats[layer]
            stats.predicted += len(predicted)
            stats.predicted_correct += len(predicted.intersection(experts))
            stats.predicted_accesses += len(experts)

    def _by_target(self, layer: int, predicted: list[int]) -> list[tuple[int, list[int]]]:
        """(target layer, ids) of the predicted ids ([D*C] flat, -1 where the policy kept fewer), nearest first."""
        targets = self.predictor.targets(layer)
        if not targets:
            return []
        per_layer = len(predicted) // len(targets)
        return [(target, [e for e in predicted[i * per_layer:(i + 1) * per_layer] if e >= 0])
                for i, target in enumerate(targets)]

    def _requests(self, position: int, by_target: list[tuple[int, list[int]]]) -> list[PrefetchRequest]:
        """The prefetch requests of ``by_target``; each becomes its target layer's prediction to score (a later,
        nearer prediction replaces an earlier one)."""
        for target, ids in by_target:
            self._predictions[target] = set(ids)
        return prefetch_requests(position, by_target)

    def stats(self) -> Stats:
        """A snapshot of the counters (copies). Synchronizes the device to read the CUDA timings."""
        if self.watchdog is not None:  # its last requests (the next pass's first layers) count too
            self.watchdog.wait_idle()
        return self._snapshot()

    def _snapshot(self) -> Stats:
        cache = self.cache
        cache.drain_timings()
        return Stats(num_slots=cache.num_slots, budget_bytes=cache.budget_bytes, expert_bytes=cache.expert_bytes,
                     forward_passes=self.loop.clock.forward_passes, copy_busy_ms=cache.copy_busy_ms,
                     peak_inflight_prefetches=cache.peak_inflight_prefetches,
                     layers=[LayerStats(**vars(s)) for s in self._layer_stats])

    def reset_stats(self) -> None:
        """Zero every counter; the cache's contents stay (changes state)."""
        if self.watchdog is not None:
            self.watchdog.wait_idle()
        self.cache.reset_timings()
        self._layer_stats[:] = [LayerStats() for _ in self._layer_stats]
        self.loop.clock.forward_passes = 0

    def close(self) -> Stats | None:
        """Stop the watchdog (its queue is dropped), release the slot pool; later calls raise
        ``ClosedHandleError``. Returns the counters' last snapshot (None when already closed)."""
        if self.closed:
            return None
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.close()
        try:
            return self._snapshot()
        finally:
            self.cache.close()
            self.pool.free()
