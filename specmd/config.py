"""Typed configuration: the offload settings and the expert budget, validated once at the boundary."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import yaml

from . import resources
from .runtime.device_policies import DEVICE_POLICIES
from .runtime.policies import POLICIES
from .runtime.prefetch import PREFETCH_POLICIES, PrefetchConfig

BudgetSpec = Union[int, float, str]

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_NUMBER = r"(-?[0-9]*\.?[0-9]+)"
_SIZE = re.compile(rf"^\s*{_NUMBER}\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(rf"^\s*{_NUMBER}\s*%\s*$")
_EXPERTS = re.compile(rf"^\s*{_NUMBER}\s*experts?\s*$", re.IGNORECASE)

# "auto" leaves this much device memory free for the KV cache and activations: the larger of 2 GiB
# and 10% of the card. A long-context user should pass an explicit budget instead.
AUTO_HEADROOM_BYTES = 2 * 2**30
AUTO_HEADROOM_FRACTION = 0.10
# Without a budget: "auto" on CUDA; on the CPU, where nothing limits the slots but the point is to run the
# cache's logic, a quarter of the experts (the command line's default too).
DEFAULT_CPU_BUDGET = "25%"

BUDGET_FORMS = ("bytes (an integer or '600MB', '0.6GB', '1.5GiB'), a fraction of all expert bytes (0.05, "
                "'0.05' or '5%'), a number of experts ('38 experts'), or 'auto' (CUDA only)")
_BUDGET_HELP = f"pass {BUDGET_FORMS}"


@dataclass(frozen=True)
class Budget:
    """An expert budget: ``bytes``, ``fraction`` of all expert bytes, ``experts`` (a count), or ``auto``
    (free device memory)."""

    kind: str  # "bytes" | "fraction" | "experts" | "auto"
    value: float = 0.0

    @classmethod
    def parse(cls, spec: BudgetSpec) -> "Budget":
        """Parse a user's budget; a ValueError says which forms are accepted."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise ValueError(f"expert_budget={spec!r} is not a budget; {_BUDGET_HELP}")
        if isinstance(spec, int):
            return cls._positive("bytes", spec, spec)
        if isinstance(spec, float):
            return cls._fraction(spec, spec)
        return cls._parse_text(spec)

    @classmethod
    def _parse_text(cls, spec: str) -> "Budget":
        if spec.strip().lower() == "auto":
            return cls("auto")
        if m := _PERCENT.match(spec):
            pct = float(m.group(1))
            if pct <= 0.0:
                raise ValueError(f"expert_budget={spec!r} must be positive; {_BUDGET_HELP}")
            if pct > 100.0:
                raise ValueError(f"expert_budget={spec!r} is over 100%: 100% already keeps every expert on the device")
            return cls("fraction", pct / 100.0)
        if m := _EXPERTS.match(spec):
            count = float(m.group(1))
            if count != int(count):
                raise ValueError(f"expert_budget={spec!r}: a number of experts is a whole number")
            return cls._positive("experts", int(count), spec)
        m = _SIZE.match(spec)
        if m and m.group(2):
            if m.group(2).lower() not in _UNITS:
                raise ValueError(f"expert_budget={spec!r}: unknown unit {m.group(2)!r}; use one of "
                                 f"{', '.join(u.upper() if len(u) == 2 else u for u in _UNITS)}, or {_BUDGET_HELP}")
            return cls._positive("bytes", int(float(m.group(1)) * _UNITS[m.group(2).lower()]), spec)
        if m:  # a bare number, as a command line passes every budget
            number = m.group(1)
            if "." in number:
                return cls._fraction(float(number), spec)
            return cls._positive("bytes", int(number), spec)
        raise ValueError(f"expert_budget={spec!r} is not understood; {_BUDGET_HELP}")

    @classmethod
    def _positive(cls, kind: str, value: int, spec) -> "Budget":
        if value < 1:
            raise ValueError(f"expert_budget={spec!r} must be positive; {_BUDGET_HELP}")
        return cls(kind, value)

    @classmethod
    def _fraction(cls, value: float, spec) -> "Budget":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"expert_budget={spec!r}: a number with a decimal point is a fraction of all expert "
                             f"bytes, in (0, 1]; for bytes pass a whole number or a unit such as '600MB'")
        return cls("fraction", value)

    def resolve(self, total_expert_bytes: int, free_device_bytes: int | None = None,
                device_total_bytes: int | None = None, expert_bytes: int | None = None) -> int:
        """The budget in bytes, given all experts' bytes, one expert's bytes (for ``experts``) and (for
        ``auto``) the device's memory."""
        if self.kind == "bytes":
            return int(self.value)
        if self.kind == "fraction":
            return int(self.value * total_expert_bytes)
        if self.kind == "experts":
            assert expert_bytes is not None, "an expert count needs the size of one expert"
            return int(self.value) * expert_bytes
        if free_device_bytes is None or device_total_bytes is None:
            raise ValueError("expert_budget='auto' needs a CUDA device to measure; pass a size or a fraction")
        headroom = max(AUTO_HEADROOM_BYTES, int(AUTO_HEADROOM_FRACTION * device_total_bytes))
        return max(0, free_device_bytes - headroom)

    def __str__(self) -> str:
        return {"bytes": f"{int(self.value)} bytes", "fraction": f"{100 * self.value:g}%",
                "experts": f"{int(self.value)} experts", "auto": "auto"}[self.kind]


_PREFETCH_KEYS = {"policy", "lookahead", "k", "p", "cap", "tau", "inline", "max_inflight", "gather_programs"}


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


# "threaded": the paper's design (main loop, prefetch loop, watchdog thread); "graph": the cache decided on
# the device, no host sync during decode (runtime/engines/graph.py).
ENGINES = ("threaded", "graph")


@dataclass(frozen=True)
class OffloadConfig:
    """Everything ``specmd.offload`` needs besides the model."""

    expert_budget: Budget
    eviction: str = "least-stale"
    device: str | None = None  # "cuda", "cuda:N", "cpu" or None (CUDA when available)
    seed: int = 0  # for the seeded random eviction policy
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    engine: str = "threaded"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")
        if self.engine == "graph" and (self.prefetch.inline or self.prefetch.max_inflight is not None):
            raise ValueError("prefetch inline / max_inflight bound the threaded engine's watchdog; engine='graph' "
                             "has none (its prefetches are queued on the device): leave them unset with it")
        if self.engine == "threaded" and self.prefetch.gather_programs is not None:
            raise ValueError("prefetch gather_programs sizes the graph engine's prefetch gather kernel; the threaded "
                             "engine copies with the copy engine: leave it unset, or pass engine='graph'")
        if self.engine == "graph" and self.eviction not in DEVICE_POLICIES:
            raise ValueError(f"engine='graph' decides evictions on the device, where {self.eviction!r} has no "
                             f"counterpart; choose one of: {', '.join(sorted(DEVICE_POLICIES))}")
        if self.eviction not in POLICIES:
            raise ValueError(
                f"unknown eviction policy {self.eviction!r}; choose one of: {', '.join(sorted(POLICIES))}"
            )
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device={self.device!r}: use 'cuda', 'cuda:N', 'cpu' or None")

    @classmethod
    def create(cls, expert_budget: BudgetSpec | Budget, eviction: str = "least-stale", device: str | None = None,
               seed: int = 0, prefetch: str | dict | PrefetchConfig = "none",
               lookahead: int | None = None, engine: str = "threaded") -> "OffloadConfig":
        """Validate keyword arguments into a config; ``lookahead`` overrides the prefetch config's."""
        prefetch_config = _prefetch_config(prefetch, "prefetch")
        if lookahead is not None:
            prefetch_config = PrefetchConfig(**{**vars(prefetch_config), "lookahead": lookahead})
        return cls(Budget.parse(expert_budget), eviction, None if device is None else str(device), seed,
                   prefetch_config, engine)

    @classmethod
    def from_yaml(cls, path: str | Path, default_budget: BudgetSpec = "auto", **overrides) -> "OffloadConfig":
        """Load a preset (keys: expert_budget, eviction, device, seed, prefetch, lookahead, engine); ``overrides``
        that are not None win; unknown keys are an error naming the key."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {"expert_budget", "eviction", "device", "seed", "prefetch", "lookahead", "engine"}
        if unknown := set(data) - known:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        if "prefetch" in data:
            data["prefetch"] = _prefetch_config(data["prefetch"], str(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        data.setdefault("expert_budget", default_budget)
        return cls.create(**data)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype, or its name ("bfloat16"); a ValueError lists the floating types otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        names = ("float32", "bfloat16", "float16")
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use one of: {', '.join(names)}")
    return value


def preset_path(name: str | Path) -> Path:
    """A preset's YAML: a path, or a name in configs/policies/; the error lists the names."""
    return resources.find("policies", name)
