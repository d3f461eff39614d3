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

    def rewind(self) -> None:
        """Back to the trace's first pass (changes state)."""
        self._pass = -1

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
        return self.trace.candidates(self._pass, layer, depth, k)

    def ids(self, layer: int, num_tokens: int) -> list[int]:
        """The recorded ids of ``layer`` in the current pass, token-major ([T*k]); checks T."""
        ids = self.trace.passes[self._pass][layer]
        if len(ids) != num_tokens * self.trace.top_k:
            raise ValueError(f"routing replay: pass {self._pass} recorded {len(ids) // self.trace.top_k} tokens "
                             f"at MoE layer {layer}, the model ran {num_tokens}; feed the trace's prompts")
        return ids


class DeviceRoutingReplay(RoutingReplay):
    """The graph engine's replay: the pass counter and the ids of the one-token passes live on ``device``, so
    a compiled decode step takes its ids there without the host (``advance``, ``step_ids``). A compiled step
    cannot raise: a pass that is not a one-token pass, or one past the trace's end, is counted on the device
    (and replays the last pass), and the next uncompiled pass raises (``begin_pass``: one sync per
    uncompiled pass, which also picks up the passes compiled steps ran)."""

    def __init__(self, trace: RoutingTrace, num_layers: int, top_k: int, device: torch.device) -> None:
        super().__init__(trace, num_layers, top_k)
        i64 = dict(dtype=torch.int64, device=device)
        self.counter = torch.full((), -1, **i64)  # the current pass, as the host's _pass between uncompiled passes
        self.wrong = torch.zeros((), **i64)  # compiled steps that met a pass they cannot replay
        prefills = set(trace.prefill_passes)  # a one-token prompt's prefill is not a decode step
        # one token and not a prefill: the decode steps, the passes a compiled step can replay
        self._decode_passes = [p for p, layers in enumerate(trace.passes) if len(layers[0]) == top_k
                               and p not in prefills]
        table = torch.zeros(len(trace.passes), num_layers, top_k, dtype=torch.int64)  # [P, L, k]
        one_token = torch.zeros(len(trace.passes), dtype=torch.bool)
        for p in self._decode_passes:
            table[p] = torch.tensor(trace.passes[p])
            one_token[p] = True
        self.table, self.one_token = table.to(device), one_token.to(device)
        self.candidates: torch.Tensor | None = None  # [P, L, D, C], when speculation is replayed too
        self.tensors = [self.counter, self.wrong, self.table, self.one_token]  # fixed addresses, for compiled steps

    @property
    def decode_passes(self) -> list[int]:
        """The trace's one-token passes that are not a prompt's prefill: those a compiled step replays."""
        return self._decode_passes

    def replay_candidates(self, depth: int, k: int) -> None:
        """Keep the trace's first ``k`` candidates for the next ``depth`` layers of every decode pass on the
        device (``step_candidates``, for compiled and uncompiled steps alike); prefills get none (-1)."""
        table = torch.full((len(self.trace.passes), self.trace.num_layers, depth, k), -1, dtype=torch.int64)
        for p in self._decode_passes:
            for layer in range(self.trace.num_layers):
                table[p, layer] = torch.tensor(self.trace.candidates(p, layer, depth, k))
        self.candidates = table.to(self.table.device)
        self.tensors.append(self.candidates)

    def step_candidates(self, layer: int) -> torch.Tensor:
        """[D, C] the trace's candidates at ``layer`` of the current pass, on the device (no sync)."""
        index = self.counter.clamp(0, self.candidates.shape[0] - 1).view(1)
        return self.candidates[:, layer].index_select(0, index)[0]

    @property
    def passes_done(self) -> int:
        return int(self.counter) + 1

    def rewind(self) -> None:
        """Back to the trace's first pass, in place: the device tensors keep their addresses, so the steps
        captured while replaying (CUDA graphs, compiled) stay valid and are not recorded again."""
        super().rewind()
        self.counter.fill_(-1)
        self.wrong.zero_()

    def begin_pass(self) -> None:
        """The next pass, from the host (changes state; one sync); raises where a compiled step went wrong."""
        if int(self.wrong):
            raise ValueError(f"routing replay: {int(self.wrong)} compiled decode steps met a pass of the trace that "
                             "is not a one-token decode step, or ran past its end; feed the trace's prompts")
        self._pass = int(self.counter)
        super().begin_pass()
        self.counter.fill_(self._pass)

    def advance(self) -> None:
        """The next pass, on the device (changes state; no sync)."""
        self.counter += 1

    def step_ids(self, layer: int) -> torch.Tensor:
        """[1, k] the ids of ``layer`` in the current pass, on the device; a pass that is not a one-token pass
        (or past the end) counts in ``wrong``, once per step (at layer 0)."""
        last = self.table.shape[0] - 1
        index = self.counter.clamp(0, last).view(1)  # index_select, not table[counter]: no read-back
        if layer == 0:
            self.wrong += (self.counter > last) | ~self.one_token.index_select(0, index)[0]
        return self.table[:, layer].index_select(0, index)
