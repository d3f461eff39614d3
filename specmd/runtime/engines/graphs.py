"""CUDA graphs of the graph engine's device steps: one graph per (layer, shapes, dtypes), shared memory pool.

Only decode steps are captured (their shapes repeat every token; a prefill's length varies). The first
call of a key runs eagerly (it warms the kernels: Triton compiles, cuBLAS picks its algorithms,
and it is a real step); the second captures the step and replays it; later calls copy their inputs into
the graph's static inputs and replay. Capture executes nothing, so the cache's state moves only by the
replays. A capture fails loudly on any host sync inside the step, which is what keeps the step sync-free;
if one fails anyway, the engine logs one line and runs every step uncaptured from then on.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

Step = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerGraphs:
    """Runs ``step(layer, module, hidden_states, top_k_index, top_k_weights)`` through CUDA graphs."""

    def __init__(self, step: Step) -> None:
        self._step = step
        self._graphs: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._seen: set[tuple] = set()
        self.disabled = False  # set, with one logged line, when a capture failed: every step runs uncaptured
        self._pool = None
        self._shapes: set[tuple] = set()  # the input shapes captured so far (a new batch size adds one)

    def run(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor) -> torch.Tensor:
        inputs = (hidden_states, top_k_index, top_k_weights)
        key = (layer, *((tuple(x.shape), x.dtype) for x in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen or self.disabled:
                self._seen.add(key)
                return self._step(layer, module, *inputs)
            entry = self._capture(key, layer, module, inputs)
            if entry is None:
                return self._step(layer, module, *inputs)
        static_inputs, graph, static_out = entry
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay of this graph overwrites static_out

    def __len__(self) -> int:
        """How many layer steps are held as captured graphs."""
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its memory (changes state)."""
        self._graphs.clear()
        self._seen.clear()
        self._shapes.clear()
        self._pool = None

    def _capture(self, key: tuple, layer: int, module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        with torch.inference_mode(False):  # a later generate outside inference mode copies into them
            static_inputs = tuple(x.clone() for x in inputs)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self._step(layer, module, *static_inputs)
        except RuntimeError as err:
            self.disabled = True
            log.warning("specmd: the graph engine's steps could not be captured as CUDA graphs (%s); they run "
                        "uncaptured", str(err).splitlines()[0])
            return None
        shape = key[1:]
        if self._shapes and shape not in self._shapes:
            log.info("specmd: decode steps of a new shape (hidden states %s): captured again", shape[0][0])
        self._shapes.add(shape)
        self._graphs[key] = static_inputs, graph, static_out
        return self._graphs[key]
