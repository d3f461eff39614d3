"""Cost model of the simulator: a link profile (how fast experts cross to the device) and a model's
compute timing, from YAML in configs/hardware/ and configs/models/.

Timeline (one copy engine, one compute stream, as the live engine): a copy starts when it is issued and
the copy engine is free, and takes expert_bytes / link rate + a per-copy overhead; a layer's compute
starts when every expert it reads is ready and takes the model's layer time (with a link profile that
carries the threaded engine's host: the layer ends at the later of its host time from its start and its
tail of compute after its copies, and its stall is what the copies add beyond the longer of the two).
Demand copies are issued when the layer starts, prefetches right after them, so prefetches never overtake
demand but queue behind it (and ahead of later demand), as on the live copy stream; a profile fitted to the
threaded engine's prefetch rows may instead start a layer's prefetch copies when its compute ends, and
charge host time per looked-ahead router and per prefetch copy (``LinkProfile``). An estimate, not a
measurement: compare it with a live run of the same trace before trusting it.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import yaml

from .. import resources
from ..runtime.adapters import family_config


def _load(cls, path: str | Path, folder: str):
    candidate = resources.find(folder, path)
    data = yaml.safe_load(candidate.read_text()) or {}
    known = {f.name for f in fields(cls)}
    if unknown := set(data) - known:
        raise ValueError(f"{candidate}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
    if missing := {f.name for f in fields(cls) if f.default is MISSING} - set(data) - {"name"}:
        raise ValueError(f"{candidate}: missing keys {sorted(missing)}")
    return cls(**{"name": candidate.stem, **data})


def _check_model(profile: str, fitted: str | None, model: str) -> None:
    if fitted is not None and model != fitted:
        raise ValueError(f"profile {profile} carries the times of {fitted}, not {model}: pass --model-timing "
                         f"{fitted}, or a profile without them (the link alone) or fitted to this model")


@dataclass(frozen=True)
class LinkProfile:
    """Host -> device link: achieved rate for expert-sized pinned copies, and a fixed cost per copy.

    Optionally the threaded engine's host on that machine, fitted to live rows of ``model``: each MoE layer
    takes ``host_layer_ms`` of host time from its start, beside its copies, and ``tail_layer_ms`` of compute
    once its copies are in (in place of the model file's layer time; ``prefill_token_ms`` more per further
    token of a pass). Unset: a layer's compute starts when its copies are in and takes ``ModelTiming``'s.

    With prefetch, that host pays ``host_predict_ms`` per looked-ahead router a layer scores (top-k) and
    ``host_prefetch_ms`` per prefetch copy it issues; with ``prefetch_after_layer`` a layer's prefetch
    copies start when the compute they were issued before ends (a chunked layer's first chunk), not at
    once. That is how the live rows behave, not a mechanism shown step by step: the copies the predictions
    ask for leave the host with the watchdog thread's and the main loop's Python work between them, and
    start later than a copy engine free at once would start them (fitted on the H200:
    ``configs/hardware/h200-threaded-measured.yaml``)."""

    name: str
    link_gbps: float  # 1e9 bytes per second
    copy_overhead_us: float = 10.0
    model: str | None = None
    host_layer_ms: float = 0.0
    tail_layer_ms: float | None = None
    prefill_token_ms: float | None = None
    host_predict_ms: float = 0.0
    host_prefetch_ms: float = 0.0
    prefetch_after_layer: bool = False

    def __post_init__(self) -> None:
        if self.link_gbps <= 0 or self.copy_overhead_us < 0:
            raise ValueError(f"link profile {self.name}: link_gbps must be > 0 and copy_overhead_us >= 0")
        host = (self.host_layer_ms, self.tail_layer_ms, self.prefill_token_ms, self.host_predict_ms,
                self.host_prefetch_ms)
        if any(v is not None and v < 0 for v in host):
            raise ValueError(f"link profile {self.name}: host_layer_ms, tail_layer_ms, prefill_token_ms, "
                             "host_predict_ms and host_prefetch_ms must be >= 0")
        if any(v for v in host if v is not None) or self.tail_layer_ms is not None or self.prefetch_after_layer:
            if self.model is None:
                raise ValueError(f"link profile {self.name}: host, tail and prefetch times are a model's: name it "
                                 "with 'model: <configs/models name>'")

    def check_model(self, model: str) -> None:
        """Refuse to price ``model`` with another model's fitted times."""
        _check_model(self.name, self.model, model)

    def layer_ms(self, model: ModelTiming, tokens: int) -> tuple[float, float]:
        """(compute once the copies are in, host time beside them) of a layer call of ``tokens`` tokens."""
        if self.tail_layer_ms is None:
            return model.layer_ms(tokens), self.host_layer_ms
        per_token = model.prefill_ms_per_token if self.prefill_token_ms is None else self.prefill_token_ms
        return self.tail_layer_ms + max(0, tokens - 1) * per_token, self.host_layer_ms

    @classmethod
    def load(cls, path: str | Path) -> "LinkProfile":
        """From a YAML path or a name in configs/hardware/."""
        return _load(cls, path, "hardware")

    def copy_ms(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9) * 1e3 + self.copy_overhead_us / 1e3


@dataclass(frozen=True)
class GraphLink:
    """Host -> device rates of the graph engine's Triton gathers, which read the pinned store directly (no
    copy engine, one launch per layer): the miss gather's, the bounded prefetch gather's, and a fixed cost
    per MoE layer (its cache calls' launches, the prefetch's fork and join). Fitted to live replays
    (``benchmarks/sim_vs_live.py --fit``); the file says on which.

    Optionally the compute fitted with them, for the ``model`` of those replays (a compiled step's layer is
    not the eager layer time of ``ModelTiming``; unset: ``ModelTiming.layer_ms``): ``step_layer_ms``, one
    MoE layer of a compiled one-token step, attention included; a prefill's layer call (uncompiled, eager
    launches) ``prefill_layer_ms`` + ``prefill_token_ms`` per token, + ``chunked_layer_ms`` when it runs
    the main loop's chunks (a host sync)."""

    name: str
    gather_gbps: float
    prefetch_gbps: float
    overhead_ms: float = 0.0
    model: str | None = None
    step_layer_ms: float | None = None
    prefill_layer_ms: float | None = None
    prefill_token_ms: float = 0.0
    chunked_layer_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.gather_gbps <= 0 or self.prefetch_gbps <= 0 or self.overhead_ms < 0:
            raise ValueError(f"graph link {self.name}: gather_gbps and prefetch_gbps must be > 0, overhead_ms >= 0")
        if any(v is not None and v < 0 for v in (self.step_layer_ms, self.prefill_layer_ms, self.prefill_token_ms,
                                                 self.chunked_layer_ms)):
            raise ValueError(f"graph link {self.name}: step_layer_ms, prefill_layer_ms, prefill_token_ms and "
                             "chunked_layer_ms must be >= 0")
        if (self.step_layer_ms is not None or self.prefill_layer_ms is not None) and self.model is None:
            raise ValueError(f"graph link {self.name}: compute (step_layer_ms, prefill_layer_ms) is a model's: "
                             "name it with 'model: <configs/models name>'")

    def check_model(self, model: str) -> None:
        """Refuse to price ``model`` with another model's fitted compute."""
        _check_model(self.name, self.model, model)

    @classmethod
    def load(cls, path: str | Path) -> "GraphLink":
        """From a YAML path or a name in configs/hardware/."""
        return _load(cls, path, "hardware")


@dataclass(frozen=True)
class ModelTiming:
    """A model's expert size and its per-MoE-layer time with every expert resident (full-GPU speed):
    ``decode_layer_ms`` for one token, plus ``prefill_ms_per_token`` for each further token of a pass."""

    name: str
    expert_bytes: int
    decode_layer_ms: float
    prefill_ms_per_token: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> "ModelTiming":
        """The ``timing`` section of a model file: a YAML path or a name in configs/models/."""
        spec = ModelSpec.load(path)
        if spec.timing is None:
            raise ValueError(f"model {spec.name} has no 'timing' section (expert_bytes, decode_layer_ms, "
                             "prefill_ms_per_token): measure it on the GPU first")
        return spec.timing

    def layer_ms(self, tokens: int) -> float:
        return self.decode_layer_ms + max(0, tokens - 1) * self.prefill_ms_per_token


@dataclass(frozen=True)
class ModelSpec:
    """A model file of configs/models/: the family, the transformers config of its real shapes, and
    optionally its measured timing for the simulator."""

    name: str
    family: str
    config: dict
    timing: ModelTiming | None = None

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        """From a YAML path or a name in configs/models/; errors name the bad key."""
        spec = _load(cls, path, "models")
        timing = spec.timing
        if timing is not None:
            if not isinstance(timing, dict):
                raise ValueError(f"model {spec.name}: 'timing' must be a mapping")
            known = {f.name for f in fields(ModelTiming)} - {"name"}
            if unknown := set(timing) - known:
                raise ValueError(f"model {spec.name}: unknown timing keys {sorted(unknown)}; valid: {sorted(known)}")
            timing = ModelTiming(spec.name, **timing)
        return cls(spec.name, spec.family, dict(spec.config), timing)

    def transformers_config(self):
        """The transformers config of these shapes (the family's config class; no weights)."""
        return family_config(self.family, **self.config)


class Timeline:
    """Simulated clocks of the copy engine and the compute stream (milliseconds)."""

    def __init__(self, link: LinkProfile, model: ModelTiming) -> None:
        link.check_model(model.name)
        self.copy_ms = link.copy_ms(model.expert_bytes)
        self.link = link
        self.model = model
        self.now = 0.0  # compute stream
        self.copy_free = 0.0  # copy engine
        self.copy_busy_ms = 0.0
        self._ready: dict[tuple[int, int], float] = {}
        self._prefetches = 0  # prefetch copies issued since the last compute
        self._after_layer: list[tuple[int, int]] = []  # prefetch copies that start when this compute ends

    def load(self, key: tuple[int, int], prefetch: bool = False) -> None:
        """A copy of ``key`` is issued now; a prefetch's, with ``prefetch_after_layer``, starts when the next
        ``compute`` ends (the simulator computes after every submission, so none is left unstarted)."""
        if prefetch:
            self._prefetches += 1
            if self.link.prefetch_after_layer:
                self._after_layer.append(key)
                return
        self._start(key)

    def _start(self, key: tuple[int, int]) -> None:
        start = max(self.now, self.copy_free)
        self.copy_free = start + self.copy_ms
        self.copy_busy_ms += self.copy_ms
        self._ready[key] = self.copy_free

    def compute(self, keys: list[tuple[int, int]], ms: float, host_ms: float = 0.0) -> float:
        """Run ``ms`` of compute reading ``keys`` once they are in, beside ``host_ms`` of host time from now
        (plus the link's host time per prefetch copy issued since the last compute); returns how long that
        waited for copies."""
        host_ms += self.link.host_prefetch_ms * self._prefetches
        start = max([self.now] + [self._ready.get(k, 0.0) for k in keys])
        end = max(self.now + host_ms, start + ms)
        # host_ms <= ms: the compute alone is the longer, so the wait is its start's delay (exactly, as before)
        stall = start - self.now if host_ms <= ms else max(0.0, end - self.now - host_ms)
        self.now = end
        for key in self._after_layer:
            self._start(key)
        self._prefetches, self._after_layer = 0, []
        return stall
