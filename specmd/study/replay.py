"""Routing replay: a model runs with its routers' choices replaced by a recorded trace.

The gate still computes (its cost is real); the expert ids come from the trace, so a full-size
random-weight model is timed with learned routing. With prefetch (top-k), the candidates come from the
trace too when it recorded them: a live run then sees the learned predictor's accuracy, not the random
routers', and its counts equal the simulator's on the same trace. Outputs are meaningless under replay: it is for
timing and cache behaviour only.
"""
from __future__ import annotations

import torch

from .trace import RoutingTrace


class RoutingReplay:
    """Hands out the trace's ids pass by pass; the engine calls ``begin_pass`` at each forward pass."""

    def __init__(self, trace: RoutingTrace, num_layers: int, top_k: int) -> None:
        if (trace.num_layers, trace.top_k) != (num_layers, top_k):
            raise ValueError(f"trace has {trace.num_layers} MoE layers, top-{trace.top_k}; the model has "
                             f"{num_layers}, top-{top_k}: replay needs the same topology")
        self.trace = trace
        self._pass = -1

    @property
    def passes_done(self) -> int:
        return self._pass + 1

    def begin_pass(self) -> None:
        """Move to the next recorded pass (changes state); raises when the trace is exhausted."""
        if self._pass + 1 >= len(self.trace.passes):
            raise ValueError(f"routing replay: the trace has only {len(self.trace.passes)} forward passes")
        self._pass += 1

    @property
    def has_predictions(self) -> bool:
        """Whether the trace recorded its predictor's candidates (specmd traces do; ids-only ones do not)."""
        return self.trace.predicted is not None

    def predicted(self, layer: int, depth: int, k: int) -> list[list[int]]:
        """The first ``k`` candidates the trace's predictor gave at ``layer`` of the current pass for each of
        the next ``depth`` layers, nearest first: what the simulator's ``topk`` prefetch takes."""
        return [candidates[:k] for candidates in self.trace.predicted[self._pass][layer][:depth]]

    def ids(self, layer: int, num_tokens: int) -> list[int]:
        """The recorded ids of ``layer`` in the current pass, token-major ([T*k]); checks T."""
        ids = self.trace.passes[self._pass][layer]
        if len(ids) != num_tokens * self.trace.top_k:
            raise ValueError(f"routing replay: pass {self._pass} recorded {len(ids) // self.trace.top_k} tokens "
                             f"at MoE layer {layer}, the model ran {num_tokens}; feed the trace's prompts")
        return ids


class DeviceRoutingReplay(RoutingReplay):
    """The graph engine's replay: the pass counter and the ids of the one-token passes live on ``device``, so
    a compiled decode step takes its ids there without the host (``advance``, ``step_ids``); the host-side
    calls read the counter back (a sync: uncompiled calls only). A compiled step cannot raise: past the
    trace's end it repeats the last pass, and ``passes_done`` shows the overrun."""

    def __init__(self, trace: RoutingTrace, num_layers: int, top_k: int, device: torch.device) -> None:
        self.counter = torch.full((), -1, dtype=torch.int64, device=device)  # before the base sets _pass
        super().__init__(trace, num_layers, top_k)
        table = torch.zeros(len(trace.passes), num_layers, top_k, dtype=torch.int64)  # [P, L, k]
        for p, layers in enumerate(trace.passes):
            if len(layers[0]) == top_k:  # one token: a decode step
                table[p] = torch.tensor(layers)
        self.table = table.to(device)
        self.tensors = [self.counter, self.table]  # updated in place / read by compiled steps: fixed addresses

    @property
    def _pass(self) -> int:
        return int(self.counter)

    @_pass.setter
    def _pass(self, value: int) -> None:
        self.counter.fill_(value)

    def advance(self) -> None:
        """The next pass, on the device (changes state; no check, no sync)."""
        self.counter += 1

    def step_ids(self, layer: int) -> torch.Tensor:
        """[1, k] the ids of ``layer`` in the current pass, which must be a one-token pass; on the device."""
        last = self.table.shape[0] - 1
        # index_select, not table[counter]: indexing by a 0-d tensor reads it back to the host
        return self.table[:, layer].index_select(0, self.counter.clamp(0, last).view(1))
