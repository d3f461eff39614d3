"""The main loop: runs after each router, in place of the experts module's own forward.

Protocol note (synchronous engine). One thread, the model's, does everything:
  1. ``run_layer`` reads the routed ids to the host (``.tolist()``: the one device->host sync per layer).
  2. For each chunk of at most ``num_slots`` distinct experts, ``SlotCache.acquire`` counts hits and queues
     misses host->slot on the cache's copy stream; the compute stream waits on each new slot's ready event.
  3. The chunk's rows are computed from the slots on the compute stream, then ``SlotCache.release``
     records each slot's last-use event, which any later overwrite of the slot waits on.
No lock is needed: nothing else touches the cache. Streams and events are owned by ``SlotCache``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import MoELayer
from .cache import SlotCache
from .compute import expert_rows
from .metrics import LayerStats, Stats

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
    """Owns the cache and the per-layer counters; called once per MoE layer per forward."""

    def __init__(self, layers: list[MoELayer], cache: SlotCache, layer_stats: list[LayerStats]) -> None:
        self.layers = layers
        self.cache = cache
        self._layer_stats = layer_stats  # shared with the cache, which counts into it
        self._last_layer = len(layers)  # so the first call starts a pass
        self._forward_passes = 0
        self.closed = False

    def run_layer(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """Compute one MoE layer's routed experts from the slot pool; syncs the host once on the routed ids.

        hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H], the same value (bit for bit in
        float32) as the module's own forward.
        """
        if self.closed:
            raise ClosedHandleError("this model's specmd handle was closed; call specmd.offload(model, ...) "
                                    "again to run it")
        if layer <= self._last_layer:
            self._forward_passes += 1
            self.cache.begin_pass()
        self._last_layer = layer
        self.cache.policy.set_layer(layer, len(self.layers))

        num_tokens, top_k = top_k_index.shape
        hidden_dim = hidden_states.shape[-1]
        device = hidden_states.device
        flat_ids = top_k_index.reshape(-1)  # [T*k]
        counts = Counter(flat_ids.tolist())  # the one device->host sync of this layer
        experts = sorted(counts)
        weights = top_k_weights.reshape(-1)  # [T*k]
        out_dtype = torch.promote_types(self.cache.layout.dtype, weights.dtype)
        out = torch.empty(num_tokens * top_k, hidden_dim, dtype=out_dtype, device=device)  # [T*k, H]
        num_experts = self.cache.layout.num_experts
        num_slots = self.cache.num_slots
        # A layer that needs more experts than there are slots runs in chunks (long prefills, small budgets).
        for start in range(0, len(experts), num_slots):
            chunk = experts[start:start + num_slots]
            slots = self.cache.acquire(layer, chunk)
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
            y = expert_rows(module, self.cache.layout, self.cache.views, x, row_slots[order], groups)  # [R, H]
            out.index_copy_(0, order, y * weights[order].unsqueeze(-1))
            self.cache.release(slots)
        # Same reduction as transformers' grouped/batched experts: sum over k in out_dtype, then cast.
        return out.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def stats(self) -> Stats:
        """A snapshot of the counters (copies; later calls do not change it)."""
        cache = self.cache
        return Stats(num_slots=cache.num_slots, budget_bytes=cache.budget_bytes,
                     expert_bytes=cache.layout.expert_bytes, forward_passes=self._forward_passes,
                     layers=[LayerStats(**vars(s)) for s in self._layer_stats])

    def reset_stats(self) -> None:
        """Zero every counter; the cache's contents stay (changes state)."""
        self._layer_stats[:] = [LayerStats() for _ in self._layer_stats]
        self._forward_passes = 0

    def close(self) -> None:
        """Release the slot pool; later calls raise ``ClosedHandleError``. Safe to call twice."""
        if not self.closed:
            self.closed = True
            self.cache.close()
