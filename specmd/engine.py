"""The main loop and the prefetch loop: run after each router, in place of the experts module's forward.

Protocol note. Two threads: the model's thread (this module) and the watchdog (``watchdog.py``).
  1. ``run_layer`` scores the current hidden state with the next ``d`` routers (``Predictor``) and reads
     the routed ids and the predicted ids to the host in one ``.tolist()``: the one sync per layer.
  2. ``SlotCache.set_position`` marks the layer as running, after the sync: while the host waited there,
     the watchdog could still issue this layer's predicted copies; from now on they are stale.
  3. For each chunk of at most ``num_slots`` distinct experts, ``SlotCache.acquire`` pins them, counts
     hits and issues demand misses host->slot on the cache's demand copy stream itself (never through
     the queue); the compute stream waits on the slots' ready events. The host never waits for a copy.
  4. After the first chunk is acquired (so demand copies are queued first), the predictions are
     triaged nearest layer first (``SlotCache.start_prefetches``): those already resident are settled,
     those that fit under the in-flight bound are issued on the cache's prefetch stream at once (on
     CUDA), and the rest go to the watchdog, which issues them as earlier prefetch copies finish.
  5. The chunk is computed from the slots on the compute stream; ``SlotCache.release`` records each
     slot's last-use event, which a later overwrite of that slot waits on.
Locks: ``SlotCache._lock`` guards the slot table, the policy and the counters; ``Watchdog._cond`` guards
the request queue. Streams and events are owned by ``SlotCache`` (each documented there).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import MoELayer
from .cache import SlotCache
from .compute import KernelPlan, expert_rows
from .metrics import LayerStats, Stats
from .prefetch import Predictor
from .recorder import TraceRecorder
from .replay import RoutingReplay
from .watchdog import Watchdog

IMPLEMENTATION_NAME = "specmd"


class ClosedHandleError(RuntimeError):
    """The offload handle was closed."""


@dataclass(frozen=True)
class Binding:
    """Attached to each experts module at install time: which engine runs it, as which MoE layer."""

    engine: "Engine"
    layer: int


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation registered with transformers under ``IMPLEMENTATION_NAME``."""
    binding = getattr(module, "_specmd_binding", None)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} uses the '{IMPLEMENTATION_NAME}' experts implementation "
                           "but was not offloaded; call specmd.offload(model, ...)")
    return binding.engine.run_layer(binding.layer, module, hidden_states, top_k_index, top_k_weights)


class Engine:
    """Owns the cache, the predictor, the watchdog and the per-layer counters; called once per MoE layer
    per forward pass."""

    def __init__(self, layers: list[MoELayer], cache: SlotCache, layer_stats: list[LayerStats],
                 predictor: Predictor, kernels: KernelPlan) -> None:
        self.layers = layers
        self.kernels = kernels
        # Set by the model's generate while it decodes (api.track_decode), as transformers switches kernels.
        self.decoding = False
        self.cache = cache
        self.predictor = predictor
        self._layer_stats = layer_stats  # shared with the cache, which counts into it
        self._last_layer = len(layers)  # so the first call starts a pass
        self._forward_passes = 0  # counted for stats; reset_stats zeroes it
        self._pass_index = 0  # never reset: positions (pass * layers + layer) must only grow
        self._predictions: dict[int, set[int]] = {}  # layer -> nearest prediction not yet checked
        config = predictor.config
        self.watchdog = Watchdog(cache) if config.enabled and not config.inline else None
        self.replay: RoutingReplay | None = None  # set by OffloadHandle.replay_routing
        self.recorder: TraceRecorder | None = None  # set by OffloadHandle.record_routing
        self.closed = False

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
        num_layers = len(self.layers)
        new_pass = layer <= self._last_layer
        if new_pass:
            self._forward_passes += 1
            self._pass_index += 1
            self.cache.begin_pass()
            if self.replay is not None:
                self.replay.begin_pass()
        self._last_layer = layer
        position = self._pass_index * num_layers + layer

        num_tokens, top_k = top_k_index.shape
        device = hidden_states.device
        predicted = self.predictor.predict(layer, hidden_states)  # [D, C] or None
        if self.replay is not None:
            # The gate ran; its choice is replaced by the trace's (the host already knows these ids).
            replayed = self.replay.ids(layer, num_tokens)
            top_k_index = torch.tensor(replayed).view(num_tokens, top_k).to(device, non_blocking=True)
        flat_ids = top_k_index.reshape(-1)  # [T*k]
        if predicted is None:
            host_ids = replayed if self.replay is not None else flat_ids.tolist()  # the one sync of this layer
        else:
            host_ids = torch.cat([flat_ids, predicted.reshape(-1).to(flat_ids.dtype)]).tolist()  # the one sync
        if self.recorder is not None:
            if new_pass:
                self.recorder.begin_pass(num_tokens)
            if self.recorder.passes:  # attached mid-pass: start at the next pass
                self.recorder.record(layer, host_ids[:num_tokens * top_k], top_k_weights, hidden_states)
        # Only now does this layer count as running: while the host waited in the sync above (GIL
        # released), the watchdog could still issue the prefetches predicted for it.
        self.cache.set_position(position, layer, num_layers)
        counts = Counter(host_ids[:num_tokens * top_k])
        self._score_prediction(layer, counts.keys())
        requests = self._prefetch_requests(layer, position, host_ids[num_tokens * top_k:])
        return self._compute(layer, module, hidden_states, flat_ids, top_k_weights, counts, requests)

    def _compute(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, flat_ids: torch.Tensor,
                 top_k_weights: torch.Tensor, counts: Counter, requests: list) -> torch.Tensor:
        """Make the layer's experts resident chunk by chunk and compute their rows; submits ``requests``
        once the first chunk's demand copies are queued. [T, H] out, no host sync."""
        num_tokens, top_k = top_k_weights.shape
        device = hidden_states.device
        experts = sorted(counts)
        weights = top_k_weights.reshape(-1)  # [T*k]
        out_dtype = torch.promote_types(self.cache.layout.dtype, weights.dtype)
        out = torch.empty(num_tokens * top_k, hidden_states.shape[-1], dtype=out_dtype, device=device)  # [T*k, H]
        num_experts = self.cache.layout.num_experts
        num_slots = self.cache.num_slots
        kernel = self.kernels.decode if self.decoding else self.kernels.prefill
        # A layer that needs more experts than there are slots runs in chunks (long prefills, small budgets).
        for start in range(0, len(experts), num_slots):
            chunk = experts[start:start + num_slots]
            slots = self.cache.acquire(layer, chunk)
            try:  # a failure mid-chunk must not leave slots pinned for good
                if start == 0 and requests:
                    self._submit(requests)
                # lut[e] = slot of e, or num_slots for experts outside the chunk: sorting by it puts this
                # chunk's rows first, grouped by slot, without another sync.
                lut = [num_slots] * num_experts
                for expert, slot in zip(chunk, slots):
                    lut[expert] = slot
                rows_total, groups = 0, []
                for slot, expert in sorted(zip(slots, chunk)):
                    groups.append((slot, rows_total, rows_total + counts[expert]))
                    rows_total += counts[expert]
                row_slots = torch.tensor(lut).to(device, non_blocking=True)[flat_ids]  # [T*k]
                order = torch.argsort(row_slots, stable=True)[:rows_total]  # [R] pair indices, by slot
                x = hidden_states[order // top_k]  # [R, H]
                y = expert_rows(module, self.cache.layout, self.cache.views, x, row_slots[order], groups,
                                kernel)  # [R, H]
                out.index_copy_(0, order, y * weights[order].unsqueeze(-1))
            finally:
                self.cache.release(slots)
        # Same reduction as transformers' grouped/batched experts: sum over k in out_dtype, then cast.
        return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _submit(self, requests: list[tuple[int, int, tuple]]) -> None:
        if self.watchdog is not None:
            # Not held back while the watchdog still has older requests: with lookahead 1 those are stale by
            # now, and handing every request to the thread brings back its GIL cost.
            self.watchdog.submit(self.cache.start_prefetches(requests))
            return
        # inline: the watchdog's order (nearest layer first, then submission order), on this thread
        for _, target, key in sorted(requests, key=lambda r: r[0]):
            self.cache.prefetch(key, target)

    def _score_prediction(self, layer: int, experts) -> None:
        """Compare the nearest prediction for ``layer`` with the distinct ``experts`` it routed to."""
        predicted = self._predictions.pop(layer, None)
        if predicted is not None:
            stats = self._layer_stats[layer]
            stats.predicted += len(predicted)
            stats.predicted_correct += len(predicted.intersection(experts))
            stats.predicted_accesses += len(experts)

    def _prefetch_requests(self, layer: int, position: int, predicted: list[int]) -> list[tuple[int, int, tuple]]:
        """(distance, target position, key) for every predicted id, nearest layer first."""
        targets = self.predictor.targets(layer)
        if not targets:
            return []
        per_layer = len(predicted) // len(targets)
        requests = []
        for distance, target in enumerate(targets, start=1):
            ids = [e for e in predicted[(distance - 1) * per_layer:distance * per_layer] if e >= 0]
            self._predictions[target] = set(ids)  # a later (nearer) prediction replaces an earlier one
            requests += [(distance, position + distance, (target, e)) for e in ids]
        return requests

    def stats(self) -> Stats:
        """A snapshot of the counters (copies). Synchronizes the device to read the CUDA timings."""
        cache = self.cache
        if self.watchdog is not None:  # its last requests (the next pass's first layers) count too
            self.watchdog.wait_idle()
        cache.drain_timings()
        return Stats(num_slots=cache.num_slots, budget_bytes=cache.budget_bytes,
                     expert_bytes=cache.layout.expert_bytes, forward_passes=self._forward_passes,
                     copy_busy_ms=cache.copy_busy_ms,
                     layers=[LayerStats(**vars(s)) for s in self._layer_stats])

    def reset_stats(self) -> None:
        """Zero every counter; the cache's contents stay (changes state)."""
        if self.watchdog is not None:
            self.watchdog.wait_idle()
        self.cache.reset_timings()
        self._layer_stats[:] = [LayerStats() for _ in self._layer_stats]
        self._forward_passes = 0

    def close(self) -> None:
        """Stop the watchdog, release the slot pool; later calls raise ``ClosedHandleError``. Idempotent."""
        if not self.closed:
            self.closed = True
            if self.watchdog is not None:
                self.watchdog.close()
            self.cache.close()
