"""The graph engine: the expert cache decided on the device, so a decode step never waits for the host.

Per MoE layer of a decode step (a call whose kernel is transformers' batched products and whose T*k routed
pairs fit the pool), everything stays on the device and on the stream the model runs on:
  1. the routed ids become a mask of needed experts [E];
  2. the cache call counts hits and misses, picks the misses' slots (free slots, then the policy's victims
     among the slots this layer does not use) and updates the table, the owners and the policy;
  3. the miss gather copies the missed experts from the pinned store into their slots.
  On CUDA, 2 and 3 are one custom op of two launches (``DeviceCache.step``, ``gather.cache_step``: the
  Triton kernels ``kernels/cache_access.py`` and ``kernels/miss_gather.py``); elsewhere torch operations
  (``DeviceCache.access``, then the gather);
  4. the rows are computed from the slots with gather + bmm, as transformers' ``batched_mm`` does.
Stream order alone makes this safe: the gather that overwrites a slot is queued after every computation
that read it. No event, no lock, no thread; nothing is read back per token (``stats`` reads the counters
when asked). A grouped call (prefill; decode on the CPU) whose distinct experts fit the pool runs on the
device too: the same cache call, then one grouped product over the slot-sorted rows (``_device_grouped``).
Other calls (the loop kernel, layers needing more experts than there are slots, a CUDA pool past one
grouped product's 1023 groups) read the routed ids once and run through the main loop's chunks
(``mainloop.py``), as the threaded engine does, with the device cache in place of the slot cache.

On CUDA, generate compiles the decode step (the static cache ``api._capture_decode`` chooses; torch.compile
in transformers' mode "reduce-overhead"): ``run_layer`` sees it is traced and takes the device step with
no Python state change, so the whole step, attention included, is one CUDA graph. Uncompiled decode steps
(a dynamic cache, ``disable_compile``) capture each layer's device step as its own CUDA graph on its second
call of a shape and replay it (``graphs.py``).

Prefetch (``prefetch=`` other than none): after a device step's own cache call, the predictor (the next
layers' routers on the layer's input, ``prefetch.Predictor``) names experts of the later layers of the same
pass, and a prefetch call per looked-ahead layer makes them resident without evicting the layer's own
(``DeviceCache.access``'s ``protect``). In a compiled step they run on a side stream that forks after the
layer's copies and joins before the next layer's cache call, overlapping the layer's compute; elsewhere
on the model's stream, in order. Predictions for the next pass (the last layers') are not made: a captured
step must join all it forks. Under a replayed trace that recorded its predictor, the candidates are the
trace's (decode steps; ``study.replay.DeviceRoutingReplay.step_candidates``).
"""
from __future__ import annotations

import contextlib
import enum
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ..adapters import MoELayer
from ..compute import (
    GROUPED_MM_MAX_GROUPS,
    Kernel,
    KernelPlan,
    expert_rows,
    sum_over_k,
    weighted_rows,
    weighted_rows_out,
    write_weighted_rows,
)
from ..copier import SlotPool
from ..device_cache import DeviceCache
from ..gather import Scoring
from ..metrics import Stats
from ..prefetch import Predictor
from ..store import layout_views
from .binding import ClosedHandleError
from .graphs import LayerGraphs
from .mainloop import MainLoop

log = logging.getLogger(__name__)


class DeviceRoutingSource(Protocol):
    """Routed ids that replace the routers' (``study.replay.DeviceRoutingReplay``): host calls for
    uncompiled layers, device ones (``advance``, ``step_ids``) inside a compiled step."""

    tensors: list[torch.Tensor]
    wrong: torch.Tensor  # compiled steps that met a pass they could not replay

    def begin_pass(self) -> None: ...

    def ids(self, layer: int, num_tokens: int) -> list[int]: ...

    def advance(self) -> None: ...

    def step_ids(self, layer: int) -> torch.Tensor: ...

    def step_candidates(self, layer: int) -> torch.Tensor: ...

    candidates: torch.Tensor | None  # the trace's predictions on the device, when speculation is replayed


class CallPath(enum.Enum):
    """How the graph engine runs one layer call (``call_path``)."""

    STEP = "step"  # one device step (batched kernel), then its prefetch calls: no host sync, capturable
    GROUPED = "grouped"  # one grouped call on the device (the device prefill): no host sync, no prefetch
    CHUNKED = "chunked"  # the main loop's chunks of at most num_slots experts: a host sync per chunk


def call_path(kernel: Kernel, pairs: int, num_experts: int, num_slots: int,
              grouped_max_slots: int | None) -> CallPath:
    """The path of a call of ``pairs`` routed (token, expert) pairs through ``kernel``: either device path needs
    the call's distinct experts (at most E, at most T*k) all in the pool; a grouped one also needs one grouped
    product to cover the pool (at most ``grouped_max_slots`` slots: CUDA's ``GROUPED_MM_MAX_GROUPS``; None: no
    limit, as on the CPU). The engine and the simulator's graph schedule (``study/graph_sim.py``) both ask this."""
    if min(num_experts, pairs) <= num_slots:
        if kernel is Kernel.BATCHED:
            return CallPath.STEP
        if kernel is Kernel.GROUPED and (grouped_max_slots is None or num_slots <= grouped_max_slots):
            return CallPath.GROUPED
    return CallPath.CHUNKED


class GraphEngine:
    """Owns the device cache and the slot pool; called once per MoE layer per forward pass."""

    name = "graph"

    def __init__(self, layers: list[MoELayer], cache: DeviceCache, pool: SlotPool, kernels: KernelPlan,
                 budget_bytes: int, predictor: Predictor | None = None) -> None:
        self.layers = layers
        self.predictor = predictor if predictor is not None and predictor.config.enabled else None
        self.cache = cache
        self.pool = pool
        self.kernels = kernels
        self.decoding = False  # set by the model's generate while it decodes (api._track_decode)
        self.budget_bytes = budget_bytes
        self.loop = MainLoop(cache, len(layers), submit=_no_prefetch)
        self.closed = False
        self.replay: DeviceRoutingSource | None = None  # set_replay (OffloadHandle.replay_routing)
        # CUDA: each layer's device step is captured as a CUDA graph and replayed (graphs.py)
        self._graphs = LayerGraphs(self._device_step) if pool.data.is_cuda else None
        # [H] a step's input, [D, E] the routers' logits on it and [D, E] their values: what the side stream
        # scores in (CUDA, top-k prediction only; ``_side_scoring``)
        self._score_buffers = _score_buffers(self.predictor, pool.data.device) if pool.data.is_cuda else None
        if pool.data.is_cuda:  # the pool, the cache's state, the store as the kernel reads it
            _mark_static([pool.data, *cache.static_tensors(), *(self._score_buffers or [])])
        self._warned: set[int] = set()

    def run_layer(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H], the value of the module's own
        forward. No host sync for a decode step (see the module note)."""
        if self.closed:
            raise ClosedHandleError("this model's specmd handle was closed; call specmd.offload(model, ...) "
                                    "again to run it")
        num_tokens, top_k = top_k_index.shape
        kernel = self.kernels.decode if self.decoding else self.kernels.prefill
        path = call_path(kernel, num_tokens * top_k, self.cache.num_experts, self.cache.num_slots,
                         GROUPED_MM_MAX_GROUPS if self.pool.data.is_cuda else None)
        if path is CallPath.STEP and torch.compiler.is_compiling():
            # Traced by torch.compile (transformers' compiled decode): one compiled call is one whole forward
            # pass, so the first MoE layer starts the pass on the device; no Python state changes, so nothing
            # is specialised on a per-token value and the step is traced once.
            if layer == 0 and self.replay is not None:
                self.replay.advance()
            if self.replay is not None:
                if num_tokens != 1:
                    raise ValueError("a compiled decode step replays one-token passes only: generate one sequence "
                                     "at a time under replay, or pass disable_compile=True to generate")
                top_k_index = self.replay.step_ids(layer)
            return self._device_step(layer, module, hidden_states, top_k_index, top_k_weights, begin=layer == 0,
                                     fork=hidden_states.is_cuda)
        return self._eager_layer(layer, module, hidden_states, top_k_index, top_k_weights, kernel, path)

    @torch.compiler.disable  # under torch.compile: a graph break, and this runs as written
    def _eager_layer(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, kernel: Kernel, path: CallPath) -> torch.Tensor:
        _, new_pass = self.loop.enter(layer)
        num_tokens, top_k = top_k_index.shape
        if self.replay is not None:  # the gate ran; its choice is replaced by the trace's
            if new_pass:
                self.replay.begin_pass()
            replayed = torch.tensor(self.replay.ids(layer, num_tokens)).view(num_tokens, top_k)
            top_k_index = replayed.to(top_k_index.device, non_blocking=True)
        with self._on_device():
            if path is CallPath.STEP:
                if self._graphs is not None and self.decoding:  # prefill lengths vary: not captured
                    return self._graphs.run(layer, module, hidden_states, top_k_index, top_k_weights)
                return self._device_step(layer, module, hidden_states, top_k_index, top_k_weights)
            if path is CallPath.GROUPED:
                return self._device_grouped(layer, module, hidden_states, top_k_index, top_k_weights)
            if self.decoding and kernel is Kernel.BATCHED:
                self._warn_chunked(num_tokens * top_k)
            flat_ids, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [T*k]
            out = self._chunked(layer, module, hidden_states, flat_ids, weights, kernel)
            return sum_over_k(out, num_tokens, top_k, hidden_states.dtype)

    def set_replay(self, replay: DeviceRoutingSource | None) -> None:
        """Take every layer's routed ids from ``replay`` from the next forward pass on (None: the routers)."""
        self._warn_unreplayed()
        if replay is not None and self.pool.data.is_cuda:
            _mark_static(replay.tensors)
        if self._graphs is not None and replay is not self.replay:
            # a captured layer step reads the replay's tensors at the addresses they had when captured
            self._graphs.clear()
        self.replay = replay

    def _warn_unreplayed(self) -> None:
        """The replay being dropped: say so if compiled steps met passes they could not replay (no uncompiled
        pass came after them to raise)."""
        wrong = int(self.replay.wrong) if self.replay is not None else 0
        if wrong:
            log.warning("specmd: %d compiled decode steps met a pass of the trace that is not a one-token decode "
                        "step, or ran past its end; their counts are not the trace's (feed the trace's prompts)",
                        wrong)

    def _on_device(self):
        """The pool's CUDA device as the current one (Triton and CUDA graphs use the current device)."""
        device = self.pool.data.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _warn_chunked(self, pairs: int) -> None:
        if pairs not in self._warned:
            self._warned.add(pairs)
            need = min(pairs, self.cache.num_experts)
            log.warning("specmd: decode steps routing %d experts per layer need %d slots and the budget gives %d: "
                        "they run chunked, with a host sync per layer; a budget of at least %d experts keeps them "
                        "on the device", pairs, need, self.cache.num_slots, need)

    @property
    def captured_graphs(self) -> int:
        """How many layer steps run as CUDA graphs now (0 off CUDA; a new replay drops them)."""
        return len(self._graphs) if self._graphs is not None else 0

    def _device_step(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, begin: bool = False, fork: bool = False) -> torch.Tensor:
        """One call on the device alone: fixed shapes, no host sync, capturable; starts a pass when ``begin``;
        prefetches on a side stream when ``fork``. [T, H] out."""
        num_tokens, top_k = top_k_index.shape
        flat_ids, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [T*k]
        scoring = self._side_scoring(layer, hidden_states) if fork else None
        predicted, targets = self._predictions(layer, hidden_states, scored=scoring is not None)
        # after=hidden_states: the copies wait for the previous layer's output, so for its reads of the pool
        layer_slots = self.cache.step(layer, flat_ids, after=hidden_states, begin=begin, predicted=predicted,
                                      targets=targets, fork=fork, scoring=scoring)
        x = hidden_states.unsqueeze(1).expand(-1, top_k, -1).reshape(num_tokens * top_k, -1)  # [T*k, H] as flat_ids
        row_slots = layer_slots[flat_ids]  # [T*k]
        # Views made here, not the pool's own: to torch.compile, views made outside are inputs aliasing the
        # pool, which the gather updates in place.
        views = layout_views(self.pool.data, self.pool.layout)
        y = expert_rows(module, self.pool.layout, views, x, row_slots, (), Kernel.BATCHED)  # [T*k, H]
        return sum_over_k(y * weights.unsqueeze(-1), num_tokens, top_k, hidden_states.dtype)

    def _device_grouped(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """A grouped call (prefill) without a host sync: the cache call and its copies as in a decode step,
        then the rows sorted by slot (stable, as the chunked path sorts them) through one grouped product
        over the pool, whose group ends are counted on the device. [T, H] out."""
        num_tokens, top_k = top_k_index.shape
        flat_ids, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [T*k]
        layer_slots = self.cache.step(layer, flat_ids, after=hidden_states)
        layout = self.pool.layout
        out = weighted_rows_out(layout, hidden_states, weights)
        write_weighted_rows(module, layout, layout_views(self.pool.data, layout), Kernel.GROUPED, hidden_states,
                            layer_slots[flat_ids], weights, None, flat_ids.shape[0], out)
        return sum_over_k(out, num_tokens, top_k, hidden_states.dtype)

    def _predictions(self, layer: int, hidden_states: torch.Tensor,
                     scored: bool = False) -> tuple[torch.Tensor | None, list[int]]:
        """([D, C] predicted ids, -1 for none, of the looked-ahead layers later in this pass; those layers) or
        (None, []). ``scored``: the side stream makes them (``_side_scoring``), so (None, those layers)."""
        targets = self._ahead(layer)
        if not targets or scored:
            return None, targets
        if self._trace_predicts:
            # the trace's predictor, not this model's; read on the device, so a captured step keeps it (decode
            # steps only: a prompt's prefill has no candidates there)
            return self.replay.step_candidates(layer)[:len(targets)], targets
        # one product per router: the stacked routers' cache is Python state a compiled step would guard on
        return self.predictor.predict(layer, hidden_states, stacked=False)[:len(targets)], targets

    def _ahead(self, layer: int) -> list[int]:
        """The looked-ahead layers later in this pass, nearest first (none without a predictor): a captured step
        must join all it forks, so the next pass's first layers are not predicted."""
        return [] if self.predictor is None else [t for t in self.predictor.targets(layer) if t > layer]

    @property
    def _trace_predicts(self) -> bool:
        """The replayed trace carries its predictor's candidates, which stand in for this model's routers."""
        return self.replay is not None and self.replay.candidates is not None

    def _side_scoring(self, layer: int, hidden_states: torch.Tensor) -> Scoring | None:
        """The routers of the layers ahead, to score a forked one-token step's input on the side stream
        (``gather.cache_step``), or None where the model's stream must predict: no predictor, the trace's
        candidates, a policy other than top-k, more than one token, no layer ahead, or routers whose
        weights are not on the buffers' device in their dtype."""
        predictor, buffers = self.predictor, self._score_buffers
        if buffers is None or hidden_states.shape[0] != 1 or self._trace_predicts:
            return None
        routers = [predictor.routers[t] for t in self._ahead(layer)]
        hidden = buffers[0]
        if not routers or any(r.weight.device != hidden.device or r.weight.dtype != hidden.dtype
                              or r.weight.shape[1] != hidden.shape[0] for r in routers):
            return None
        biases = [getattr(r, "bias", None) for r in routers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return None  # the op takes biases for all routers or none
        return Scoring([r.weight for r in routers], biases if biases[0] is not None else [], buffers,
                       predictor.candidates)

    def _chunked(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, flat_ids: torch.Tensor,
                 weights: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        """The layer through the main loop's chunks of at most num_slots experts; reads the ids (one sync), and
        each chunk's slots."""
        layout = self.pool.layout
        out = weighted_rows_out(layout, hidden_states, weights)
        counts = Counter(flat_ids.tolist())

        def compute_chunk(chunk: Sequence[int], slots: list[int]) -> None:
            weighted_rows(module, layout, self.pool.views, kernel, hidden_states, flat_ids, weights, counts, chunk,
                          slots, out)

        self.loop.run(layer, sorted(counts), [], compute_chunk)
        return out

    def stats(self) -> Stats:
        """A snapshot of the counters; reads them from the device (one sync)."""
        layout = self.pool.layout
        return Stats(num_slots=self.cache.num_slots, budget_bytes=self.budget_bytes,
                     expert_bytes=layout.expert_bytes, forward_passes=int(self.cache.passes),
                     layers=self.cache.stats(layout.expert_bytes), prefetch_outcomes_counted=False)

    def reset_stats(self) -> None:
        """Zero every counter; the cache's contents stay (changes state)."""
        self.cache.reset_counters()

    def close(self) -> Stats | None:
        """Release the slot pool; later calls raise ``ClosedHandleError``. Returns the last snapshot (None
        when already closed)."""
        if self.closed:
            return None
        self.closed = True
        self._warn_unreplayed()
        try:
            return self.stats()
        finally:
            self.pool.free()
            if self._graphs is not None:
                self._graphs.clear()


def _score_buffers(predictor: Predictor | None, device: torch.device) -> list[torch.Tensor] | None:
    """Persistent buffers for scoring on the side stream, in the routers' dtype, or None (no top-k predictor,
    or routers of different shapes or dtypes: the model's stream predicts)."""
    if predictor is None or predictor.config.policy != "topk":
        return None
    weights = [r.weight for r in predictor.routers]
    if len({(w.shape, w.dtype) for w in weights}) != 1:
        return None
    (num_experts, hidden), dtype = weights[0].shape, weights[0].dtype
    depth = max(len(predictor.targets(layer)) for layer in range(len(weights)))
    with torch.inference_mode(False):  # updated in place by every later step
        return [torch.zeros(hidden, dtype=dtype, device=device),
                torch.zeros(depth, num_experts, dtype=dtype, device=device),
                torch.zeros(depth, num_experts, dtype=dtype, device=device)]


def _mark_static(tensors: list[torch.Tensor]) -> None:
    """torch.compile captures a step as a CUDA graph only if the tensors it updates in place keep their
    addresses; these do, for the engine's life."""
    from torch._dynamo import mark_static_address

    for tensor in tensors:
        mark_static_address(tensor)


def _no_prefetch(requests) -> None:
    assert not requests, "the graph engine prefetches from its device steps, never through the main loop's chunks"
