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

    @property
    def misses(self) -> int:
        return self.misses_cold + self.misses_capacity + self.misses_collision

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
    layers: list[LayerStats] = field(default_factory=list)

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

    def to_dict(self) -> dict:
        """Plain dict for ``json.dumps``: totals and per-layer counts, misses included."""
        def layer_dict(s: LayerStats) -> dict:
            return {**asdict(s), "misses": s.misses}
        return {
            "num_slots": self.num_slots,
            "budget_bytes": self.budget_bytes,
            "expert_bytes": self.expert_bytes,
            "forward_passes": self.forward_passes,
            "hit_rate": self.hit_rate,
            "total": layer_dict(self.total),
            "layers": [layer_dict(s) for s in self.layers],
        }

    def summary(self) -> str:
        """One human-readable line."""
        t = self.total
        return (f"slots={self.num_slots} passes={self.forward_passes} accesses={t.accesses} hits={t.hits} "
                f"({self.hit_rate:.1%}) misses={t.misses} (cold {t.misses_cold}, capacity {t.misses_capacity}, "
                f"collision {t.misses_collision}) evictions={t.evictions} copied={t.bytes_copied / 2**20:.1f} MiB")
