"""Counters of the cache and engine, per MoE layer and in total; JSON-serialisable."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerStats:
    """Counts for one MoE layer. An access is one distinct expert needed by one layer call."""

    accesses: int = 0
    hits: int = 0
    misses_cold: int = 0  # never loaded before
    misses_capacity: int = 0  # evicted in an earlier forward pass
    misses_collision: int = 0  # evicted earlier in the same forward pass
    evictions: int = 0
    bytes_copied: int = 0
    prefetch_hits: int = 0  # hit on an expert a prefetch brought, at its first demand access
    late_prefetches: int = 0  # prefetched, but its copy was still in flight when needed
    prefetches: int = 0  # prefetch copies issued
    prefetch_bytes: int = 0
    wasted_prefetch_bytes: int = 0  # prefetched, then evicted before any demand access
    predicted: int = 0  # experts predicted for this layer (nearest prediction)
    predicted_correct: int = 0  # ... of which the router then chose
    predicted_accesses: int = 0  # accesses of layer calls that had a prediction
    stall_ms: float = 0.0  # compute stream waiting on copies (CUDA events)

    @property
    def misses(self) -> int:
        return self.misses_cold + self.misses_capacity + self.misses_collision

    @property
    def precision(self) -> float:
        return self.predicted_correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.predicted_correct / self.predicted_accesses if self.predicted_accesses else 0.0

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Stats:
    """A snapshot of ``model.specmd.stats()``."""

    num_slots: int
    budget_bytes: int
    expert_bytes: int
    forward_passes: int = 0
    copy_busy_ms: float = 0.0  # copy stream busy, summed over copies (CUDA events)
    peak_inflight_prefetches: int = 0  # the most prefetch copies queued on the device at once (CUDA)
    layers: list[LayerStats] = field(default_factory=list)
    # Simulator only: its cost model's estimates (None in live runs, which measure instead)
    estimated_ttft_ms: float | None = None
    estimated_tpot_ms: float | None = None
    # False for the graph engine: its device counters count prefetch hits and wasted prefetches, but no late
    # prefetch (the next layer waits for every prefetch on the device) and no prediction precision or recall,
    # which read 0, not measured
    prefetch_outcomes_counted: bool = True

    @property
    def total(self) -> LayerStats:
        total = LayerStats()
        for layer in self.layers:
            total.add(layer)
        return total

    @property
    def hit_rate(self) -> float:
        total = self.total
        return total.hits / total.accesses if total.accesses else 0.0

    @property
    def stall_ms(self) -> float:
        return self.total.stall_ms

    def to_dict(self) -> dict:
        """Plain dict for ``json.dumps``: totals and per-layer counts, misses included."""
        def layer_dict(s: LayerStats) -> dict:
            return {**asdict(s), "misses": s.misses, "precision": s.precision, "recall": s.recall}
        return {
            "num_slots": self.num_slots,
            "budget_bytes": self.budget_bytes,
            "expert_bytes": self.expert_bytes,
            "forward_passes": self.forward_passes,
            "copy_busy_ms": self.copy_busy_ms,
            "peak_inflight_prefetches": self.peak_inflight_prefetches,
            "prefetch_outcomes_counted": self.prefetch_outcomes_counted,
            "stall_ms": self.stall_ms,
            "hit_rate": self.hit_rate,
            **({"estimated_ttft_ms": self.estimated_ttft_ms, "estimated_tpot_ms": self.estimated_tpot_ms}
               if self.estimated_tpot_ms is not None else {}),
            "total": layer_dict(self.total),
            "layers": [layer_dict(s) for s in self.layers],
        }

    def summary(self) -> str:
        """One human-readable line."""
        t = self.total
        line = (f"slots={self.num_slots} passes={self.forward_passes} accesses={t.accesses} hits={t.hits} "
                f"({self.hit_rate:.1%}) misses={t.misses} (cold {t.misses_cold}, capacity {t.misses_capacity}, "
                f"collision {t.misses_collision}) copied={t.bytes_copied / 2**20:.1f} MiB")
        if (t.prefetches or t.predicted) and not self.prefetch_outcomes_counted:
            line += (f" prefetches={t.prefetches} evictions={t.evictions} (by misses and prefetches) prefetch: "
                     f"hits={t.prefetch_hits} wasted={t.wasted_prefetch_bytes / 2**20:.1f} MiB (lateness and "
                     "precision not counted by the graph engine)")
        elif t.prefetches or t.predicted:
            # Prefetches are loads too: they evict, so evictions can exceed misses.
            line += (f" prefetches={t.prefetches} evictions={t.evictions} (by misses and prefetches) prefetch: "
                     f"hits={t.prefetch_hits} late={t.late_prefetches} precision={t.precision:.2f} "
                     f"recall={t.recall:.2f} wasted={t.wasted_prefetch_bytes / 2**20:.1f} MiB")
        else:
            line += f" evictions={t.evictions}"
        if self.copy_busy_ms:
            line += f" stall={t.stall_ms:.1f} ms copy-busy={self.copy_busy_ms:.1f} ms"
        return line
