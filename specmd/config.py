"""Typed configuration: the offload settings and the expert budget, validated once at the boundary."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import yaml

from . import resources
from .runtime.policies import POLICIES
from .runtime.prefetch import PREFETCH_POLICIES, PrefetchConfig

BudgetSpec = Union[int, float, str]

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

# "auto" leaves this much device memory free for the KV cache and activations: the larger of 2 GiB
# and 10% of the card. A long-context user should pass an explicit budget instead.
AUTO_HEADROOM_BYTES = 2 * 2**30
AUTO_HEADROOM_FRACTION = 0.10

_BUDGET_HELP = (
    "pass bytes (int), a size string such as '600MB', '0.6GB' or '1.5GiB', a fraction of all expert "
    "bytes such as 0.05 or '5%', or 'auto'"
)


@dataclass(frozen=True)
class Budget:
    """An expert budget: ``bytes``, ``fraction`` of all expert bytes, or ``auto`` (free device memory)."""

    kind: str  # "bytes" | "fraction" | "auto"
    value: float = 0.0

    @classmethod
    def parse(cls, spec: BudgetSpec) -> "Budget":
        """Parse a user's budget; a ValueError says which forms are accepted."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"expert_budget={spec!r} is not a budget; {_BUDGET_HELP}")
        if isinstance(spec, int):
            if spec <= 0:
                raise ValueError(f"expert_budget={spec} must be positive; {_BUDGET_HELP}")
            return cls("bytes", spec)
        if isinstance(spec, float):
            if not 0.0 < spec <= 1.0:
                raise ValueError(f"expert_budget={spec} as a float is a fraction in (0, 1]; {_BUDGET_HELP}")
            return cls("fraction", spec)
        if isinstance(spec, str):
            if spec.strip().lower() == "auto":
                return cls("auto")
            if m := _PERCENT.match(spec):
                pct = float(m.group(1))
                if not 0.0 < pct <= 100.0:
                    raise ValueError(f"expert_budget={spec!r} must be within (0%, 100%]")
                return cls("fraction", pct / 100.0)
            if (m := _SIZE.match(spec)) and m.group(2).lower() in _UNITS | {"": 1}:
                n = float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)
                if n < 1:
                    raise ValueError(f"expert_budget={spec!r} must be positive; {_BUDGET_HELP}")
                return cls("bytes", int(n))
        raise ValueError(f"expert_budget={spec!r} is not understood; {_BUDGET_HELP}")

    def resolve(self, total_expert_bytes: int, free_device_bytes: int | None = None,
                device_total_bytes: int | None = None) -> int:
        """The budget in bytes, given all experts' bytes and (for ``auto``) the device's memory."""
        if self.kind == "bytes":
            return int(self.value)
        if self.kind == "fraction":
            return int(self.value * total_expert_bytes)
        if free_device_bytes is None or device_total_bytes is None:
            raise ValueError("expert_budget='auto' needs a CUDA device to measure; pass a size or a fraction")
        headroom = max(AUTO_HEADROOM_BYTES, int(AUTO_HEADROOM_FRACTION * device_total_bytes))
        return max(0, free_device_bytes - headroom)


_PREFETCH_KEYS = {"policy", "lookahead", "k", "p", "cap", "tau", "inline", "max_inflight"}


def _prefetch_config(spec, where: str) -> PrefetchConfig:
    if isinstance(spec, PrefetchConfig):
        return spec
    if isinstance(spec, str):
        return PrefetchConfig(policy=spec)
    if isinstance(spec, dict):
        if unknown := set(spec) - _PREFETCH_KEYS:
            raise ValueError(f"{where}: unknown prefetch keys {sorted(unknown)}; valid keys: {sorted(_PREFETCH_KEYS)}")
        return PrefetchConfig(**spec)
    raise ValueError(f"{where}: prefetch must be one of {', '.join(PREFETCH_POLICIES)} or a mapping of "
                     f"{sorted(_PREFETCH_KEYS)}")


@dataclass(frozen=True)
class OffloadConfig:
    """Everything ``specmd.offload`` needs besides the model."""

    expert_budget: Budget
    eviction: str = "least-stale"
    device: str | None = None  # "cuda", "cuda:N", "cpu" or None (CUDA when available)
    seed: int = 0  # for the seeded random eviction policy
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    def __post_init__(self) -> None:
        if self.eviction not in POLICIES:
            raise ValueError(
                f"unknown eviction policy {self.eviction!r}; choose one of: {', '.join(sorted(POLICIES))}"
            )
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device={self.device!r}: use 'cuda', 'cuda:N', 'cpu' or None")

    @classmethod
    def create(cls, expert_budget: BudgetSpec | Budget, eviction: str = "least-stale", device: str | None = None,
               seed: int = 0, prefetch: str | dict | PrefetchConfig = "none",
               lookahead: int | None = None) -> "OffloadConfig":
        """Validate keyword arguments into a config; ``lookahead`` overrides the prefetch config's."""
        prefetch_config = _prefetch_config(prefetch, "prefetch")
        if lookahead is not None:
            prefetch_config = PrefetchConfig(**{**vars(prefetch_config), "lookahead": lookahead})
        return cls(Budget.parse(expert_budget), eviction, None if device is None else str(device), seed,
                   prefetch_config)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "OffloadConfig":
        """Load a preset (keys: expert_budget, eviction, device, seed, prefetch, lookahead); ``overrides``
        that are not None win; unknown keys are an error naming the key."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {"expert_budget", "eviction", "device", "seed", "prefetch", "lookahead"}
        if unknown := set(data) - known:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        if "prefetch" in data:
            data["prefetch"] = _prefetch_config(data["prefetch"], str(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        data.setdefault("expert_budget", "auto")
        return cls.create(**data)


def preset_path(name: str | Path) -> Path:
    """A preset's YAML: a path, or a name in configs/policies/; the error lists the names."""
    return resources.find("policies", name)
