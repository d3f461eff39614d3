"""``specmd bench``: the benchmark matrix, configured in configs/bench/*.yaml.

This module holds the configuration and its validation; ``runner.py`` runs it on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from ..config import Budget, preset_path
from ..study.costmodel import LinkProfile, ModelSpec

BASELINES = ("full-gpu", "full-gpu-grouped-mm", "device-map-auto", "on-demand")  # a config's default
# Also measured on request: full GPU with transformers' compiled decode step (CUDA graphs), the graph engine's
# like (runner.py measures it anyway, as that engine's token reference, when a graph preset runs on CUDA).
KNOWN_BASELINES = (*BASELINES, "full-gpu-compiled")
RANDOM_ROUTING = "random"  # the model's own routers (random weights: degenerate routing, labelled so)
REPLAY = "replay"  # "replay PATH": the routers' choices replaced by a learned trace's (``replay_routing``)
NATIVE_LINK = "native"  # the machine's own link, measured before each run
PLACES = ("device", "host")  # where a model is built: whole on the GPU, or experts in the host store


def _fixed_budget(spec) -> None:
    if Budget.parse(spec).kind == "auto":
        raise ValueError("'auto' depends on the free device memory at run time; give a fraction or bytes "
                         "so every run of the matrix gets the same budget")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark matrix: every model x budget x link x prompt x batch x preset, plus the baselines."""

    models: tuple[str, ...]
    budgets: tuple[str, ...]
    prompts: tuple[int, ...]
    links: tuple[str, ...] = (NATIVE_LINK,)
    new_tokens: int = 64
    batch: tuple[int, ...] = (1,)
    repeats: int = 3
    presets: tuple[str, ...] = ("lru-noprefetch", "least-stale-topk")
    baselines: tuple[str, ...] = BASELINES
    # None: on the device when the whole model fits there, else into the host store (models.build_model)
    place: str | None = None
    # "random", or per model (its entry in ``models``): "random" or "replay PATH" (a learned trace of the
    # model's topology); models left out of the mapping run on their own routers
    routing: str | dict = RANDOM_ROUTING
    # decode passes replayed per prompt (the trace's first ones), for every model or per model: a shorter
    # replay where each step copies gigabytes; None replays each prompt whole
    replay_decode: int | dict | None = None

    @classmethod
    def load(cls, path: str | Path) -> "BenchConfig":
        """Read and validate a config; every error names the key (and the valid choices)."""
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a bench config is a mapping of keys to values")
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(data) - set(known)):
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(known)}")
        for key in ("models", "budgets", "prompts"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "place":
                if value not in PLACES:
                    raise ValueError(f"{path}: 'place' must be one of {', '.join(PLACES)} (or left out), "
                                     f"not {value!r}")
                values[f.name] = value
                continue
            if f.name in ("routing", "replay_decode"):  # checked with the models they name (_check)
                values[f.name] = value
                continue
            if f.name in ("new_tokens", "repeats"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{path}: {f.name!r} must be a positive integer, not {value!r}")
                values[f.name] = value
                continue
            if not isinstance(value, list) or not value:
                raise ValueError(f"{path}: {f.name!r} must be a non-empty list")
            values[f.name] = tuple(value)
        config = cls(**values)
        config._check(str(path))
        return config

    def overridden(self, where: str, budgets: str | None = None, baselines: str | None = None,
                   presets: str | None = None, models: str | None = None) -> "BenchConfig":
        """This matrix with its budgets, baselines and/or presets replaced (comma lists; baselines ``none`` for
        none), or narrowed to some of its models, validated: one part of a matrix too long for one run
        (``benchmarks/merge_bench.py`` joins the parts)."""
        changes = {}
        if models is not None:
            chosen = tuple(m.strip() for m in models.split(",") if m.strip())
            if not chosen:
                raise ValueError(f"{where}: --models: give at least one of {', '.join(self.models)}")
            if repeated := [m for m in chosen if chosen.count(m) > 1]:
                raise ValueError(f"{where}: --models: {repeated[0]!r} is named twice; name each model once")
            if unknown := [m for m in chosen if m not in self.models]:
                raise ValueError(f"{where}: --models: {unknown[0]!r} is not one of the config's models "
                                 f"({', '.join(self.models)})")
            changes["models"] = chosen
            if isinstance(self.routing, dict):  # a model left out keeps no entry
                changes["routing"] = {m: spec for m, spec in self.routing.items() if m in chosen}
            if isinstance(self.replay_decode, dict):
                changes["replay_decode"] = {m: n for m, n in self.replay_decode.items() if m in chosen} or None
        if budgets is not None:
            changes["budgets"] = tuple(b.strip() for b in budgets.split(",") if b.strip())
            if not changes["budgets"]:
                raise ValueError(f"{where}: --budgets: give at least one budget, e.g. 5%,10%")
        if baselines is not None:
            changes["baselines"] = () if baselines.strip() == "none" else \
                tuple(b.strip() for b in baselines.split(",") if b.strip())
        if presets is not None:
            changes["presets"] = () if presets.strip() == "none" else \
                tuple(p.strip() for p in presets.split(",") if p.strip())
            if not changes["presets"] and presets.strip() != "none":
                raise ValueError(f"{where}: --presets: give at least one preset, e.g. lru-noprefetch (or none: "
                                 "the baselines alone)")
        config = replace(self, **changes)
        if not config.presets and not config.baselines:
            raise ValueError(f"{where}: --presets none with no baselines leaves nothing to run")
        config._check(where)
        return config

    def _check(self, where: str) -> None:
        def each(key: str, values, check, hint: str = "") -> None:
            for value in values:
                try:
                    check(value)
                except ValueError as err:
                    raise ValueError(f"{where}: {key}: {err}{hint}") from None

        each("models", self.models, ModelSpec.load)
        each("budgets", self.budgets, _fixed_budget)
        each("links", [link for link in self.links if link != NATIVE_LINK], LinkProfile.load, f" (or '{NATIVE_LINK}')")
        each("presets", self.presets, preset_path)
        if bad := [b for b in self.baselines if b not in KNOWN_BASELINES]:
            raise ValueError(f"{where}: baselines: unknown {bad[0]!r}; choose from {', '.join(KNOWN_BASELINES)}")
        for key in ("prompts", "batch"):
            if bad := [v for v in getattr(self, key) if not isinstance(v, int) or isinstance(v, bool) or v < 1]:
                raise ValueError(f"{where}: {key!r}: {bad[0]!r} is not a positive integer")
        self._check_routing(where)
        self._check_replay_decode(where)

    def _check_replay_decode(self, where: str) -> None:
        cap = self.replay_decode
        if cap is None:
            return
        caps = cap if isinstance(cap, dict) else {model: cap for model in self.models if self.trace_path(model)}
        if not caps:
            raise ValueError(f"{where}: replay_decode: no model replays a trace; give 'routing: {{MODEL: {REPLAY} "
                             "PATH}' or drop replay_decode")
        for model, steps in caps.items():
            if model not in self.models:
                raise ValueError(f"{where}: replay_decode: {model!r} is not one of the models "
                                 f"({', '.join(self.models)})")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"{where}: replay_decode of {model}: {steps!r}; give a positive number of decode "
                                 "steps per prompt (or leave the key out to replay each prompt whole)")
            if self.trace_path(model) is None:
                raise ValueError(f"{where}: replay_decode of {model}: the model replays no trace; give it "
                                 f"'routing: {{{model}: {REPLAY} PATH}}' or drop its replay_decode")

    def _check_routing(self, where: str) -> None:
        routing = self.routing
        if routing == RANDOM_ROUTING:
            return
        if not isinstance(routing, dict):
            raise ValueError(f"{where}: 'routing' must be '{RANDOM_ROUTING}' or a mapping of models to "
                             f"'{RANDOM_ROUTING}' or '{REPLAY} PATH', not {routing!r}")
        from ..study.trace import load_trace

        for model, spec in routing.items():
            if model not in self.models:
                raise ValueError(f"{where}: routing: {model!r} is not one of the models ({', '.join(self.models)})")
            kind, _, path = str(spec).partition(" ")
            if kind == RANDOM_ROUTING and not path:
                continue
            if kind != REPLAY or not path.strip():
                raise ValueError(f"{where}: routing of {model}: {spec!r}; write '{RANDOM_ROUTING}' or "
                                 f"'{REPLAY} PATH' (a trace file, e.g. {REPLAY} benchmarks/traces/...json)")
            try:
                trace = load_trace(path.strip())
            except OSError as err:
                raise ValueError(f"{where}: routing of {model}: cannot read the trace {path.strip()!r} ({err}); "
                                 "paths are relative to the directory specmd bench runs in") from None
            except ValueError as err:
                raise ValueError(f"{where}: routing of {model}: {err}") from None
            from .models import moe_topology

            shape = moe_topology(ModelSpec.load(model))
            if (trace.num_layers, trace.num_experts, trace.top_k) != shape:
                raise ValueError(f"{where}: routing of {model}: {path.strip()} routes {trace.num_layers} MoE layers x "
                                 f"{trace.num_experts} experts, top-{trace.top_k}; the model has {shape[0]} x "
                                 f"{shape[1]}, top-{shape[2]}: give it a trace of its own topology")

    def trace_path(self, model: str) -> str | None:
        """The trace ``model``'s runs replay (None: its own routers)."""
        spec = self.routing.get(model, RANDOM_ROUTING) if isinstance(self.routing, dict) else self.routing
        kind, _, path = str(spec).partition(" ")
        return path.strip() if kind == REPLAY else None

    def replay_decode_of(self, model: str) -> int | None:
        """Decode passes replayed per prompt for ``model`` (None: each prompt whole)."""
        cap = self.replay_decode
        return cap.get(model) if isinstance(cap, dict) else cap

    @property
    def num_runs(self) -> int:
        """specmd runs in the matrix (baselines not counted)."""
        return (len(self.models) * len(self.budgets) * len(self.links) * len(self.prompts) * len(self.batch)
                * len(self.presets))
