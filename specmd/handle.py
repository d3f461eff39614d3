"""``model.specmd``: the handle of one offloaded model (statistics, routing replay and recording, lifetime)."""
from __future__ import annotations

import copy
import logging
import weakref
from pathlib import Path

from torch import nn

from .config import OffloadConfig
from .runtime.engines.binding import ClosedHandleError
from .runtime.engines.graph import GraphEngine
from .runtime.engines.threaded import ThreadedEngine
from .runtime.metrics import Stats
from .runtime.store import HostStore
from .study.recorder import TraceRecorder
from .study.replay import DeviceRoutingReplay, RoutingReplay
from .study.trace import RoutingTrace, load_trace

log = logging.getLogger(__name__)


class OffloadHandle:
    """``model.specmd``: statistics and lifetime of one offloaded model. Also a context manager."""

    def __init__(self, engine: ThreadedEngine | GraphEngine, config: OffloadConfig, store: HostStore, top_k: int,
                 implementation: str, model: nn.Module) -> None:
        self.config = config
        self._engine = engine
        self._top_k = top_k
        self.store = store  # kept after close: offloading the model again reuses it, no re-pinning
        self.implementation = implementation  # the experts implementation the model had before offload
        self._model = weakref.ref(model)  # the model holds the handle: no cycle keeping both alive
        self._final_stats: Stats | None = None  # taken at close
        self.load_report = None  # from_pretrained: its time by stage, bytes read and host memory (load_report.py)
        self.set_static_cache = False  # the graph engine chose generate's static cache (api._capture_decode)

    @property
    def engine(self) -> ThreadedEngine | GraphEngine:
        """The engine running this model's MoE layers (inspection and tests; its API is not stable)."""
        return self._engine

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def num_slots(self) -> int:
        """How many experts the device pool holds at once."""
        self._check_open()
        return self._engine.cache.num_slots

    def resident_experts(self) -> dict[tuple[int, int], int]:
        """Which experts the device holds now: (MoE layer, expert) -> slot (a copy)."""
        self._check_open()
        return self._engine.cache.resident()

    def emulate_link(self, stretch_cycles: int) -> None:
        """Make every later copy last as long as on a slower link: each is followed by a GPU sleep of
        ``stretch_cycles`` clock cycles and copies are serialized (CUDA only; 0 turns it off). Benchmarks
        compute the cycles with ``specmd.bench.timing.calibrate_link``."""
        self._check_threaded("link emulation")
        self._engine.cache.emulate_link(stretch_cycles)

    def stats(self) -> Stats:
        """Hits, misses (cold / capacity / collision), evictions and bytes copied, per layer and in total.
        Synchronizes the device. After ``close``: the snapshot taken at close."""
        if self._engine.closed and self._final_stats is not None:
            return copy.deepcopy(self._final_stats)
        self._check_open()
        return self._engine.stats()

    def reset_stats(self) -> None:
        """Zero the counters; cached experts stay resident."""
        self._check_open()
        self._engine.reset_stats()

    def replay_routing(self, trace: RoutingTrace | str | Path | None) -> None:
        """From the next forward pass on, take every MoE layer's expert ids from ``trace`` (a RoutingTrace or
        a trace file) instead of the router, pass by pass; ``None`` returns to the router. Feed the trace's
        prompts (``trace.prompts``: lengths and decode steps). For timing and cache studies: the outputs
        are not the model's."""
        self._check_open()
        if trace is None:
            self._engine.set_replay(None)
            return
        if not isinstance(trace, RoutingTrace):
            trace = load_trace(trace)
        num_layers = len(self._engine.layers)
        if isinstance(self._engine, GraphEngine):  # compiled steps read the ids on the device
            replay = DeviceRoutingReplay(trace, num_layers, self._top_k, self._engine.pool.data.device)
        else:
            replay = RoutingReplay(trace, num_layers, self._top_k)
        prefetch = self.config.prefetch
        if prefetch.enabled and replay.has_predictions:
            if prefetch.policy != "topk":
                raise ValueError(f"under replay the prefetch candidates come from the trace, which ranks them "
                                 f"without probabilities: use prefetch='topk' (not {prefetch.policy!r})")
            candidates = len(trace.predicted[0][0][0])
            if (prefetch.k or self._top_k) > candidates:
                raise ValueError(f"prefetch k={prefetch.k or self._top_k}: {trace.source} recorded {candidates} "
                                 f"candidates per layer; offload with prefetch k <= {candidates}")
            if prefetch.lookahead > trace.lookahead:
                raise ValueError(f"lookahead={prefetch.lookahead}: {trace.source} recorded predictions "
                                 f"{trace.lookahead} layers ahead at most; offload with lookahead <= {trace.lookahead}")
            if isinstance(replay, DeviceRoutingReplay):  # compiled steps take the candidates on the device
                replay.replay_candidates(prefetch.lookahead, prefetch.k or self._top_k)
        elif prefetch.enabled:
            log.warning("specmd: %s holds routed ids only: under replay, prefetch asks this model's own routers",
                        trace.source)
        self._engine.set_replay(replay)

    def rewind_replay(self) -> None:
        """Start the routing replay set by ``replay_routing`` over from the trace's first pass, keeping what was
        captured or compiled while it ran (a new ``replay_routing`` of the same trace drops the graph engine's
        captured steps): to time a replay after a warm-up replay."""
        self._check_open()
        if self._engine.replay is None:
            raise ValueError("no routing replay to rewind: call model.specmd.replay_routing(trace) first")
        self._engine.replay.rewind()

    def record_routing(self, lookahead: int = 3, candidates: int | None = None, model: str = "") -> TraceRecorder:
        """Start recording every forward pass's routing (and the predictor's candidates at ``lookahead``
        1..3) into the returned recorder; ``stop_recording`` ends it. Save with ``recorder.save(path)``."""
        self._check_threaded("routing recording")
        layers = self._engine.layers
        if any(layer.router is None for layer in layers):
            raise ValueError("recording needs each MoE layer's router; this model has none")
        recorder = TraceRecorder([layer.router for layer in layers], layers[0].layout.num_experts, self._top_k,
                                 lookahead, candidates, model)
        self._engine.recorder = recorder
        return recorder

    def stop_recording(self) -> None:
        """Detach the recorder (it keeps what it recorded)."""
        self._engine.recorder = None

    def close(self) -> None:
        """Free the device slots. The experts stay in host memory (the model's parameters point there);
        the model cannot run until offloaded again; ``stats()`` keeps the last figures. Safe to call twice."""
        if not self._engine.closed:
            self._final_stats = self._engine.close()
        model = self._model()
        if model is not None:
            model.__dict__.pop("_optimize_model_for_decode", None)
            if self.set_static_cache:
                model.generation_config.cache_implementation = None
                # generate keeps its compiled step on the model (and, in some transformers versions, its static
                # cache): let them go with the engine; the next offload compiles afresh
                for name in ("_compiled_call", "_last_compile_config", "_cache"):
                    model.__dict__.pop(name, None)
        self.set_static_cache = False

    def _check_threaded(self, what: str) -> None:
        self._check_open()
        if not isinstance(self._engine, ThreadedEngine):
            raise ValueError(f"{what} runs in the threaded engine; offload with engine='threaded' for it")

    def _check_open(self) -> None:
        if self._engine.closed:
            raise ClosedHandleError("this specmd handle was closed; call specmd.offload(model, ...) again")

    def __enter__(self) -> "OffloadHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


