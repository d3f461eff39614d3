"""Trace recorder: what the routers chose, with what weight, and what the predictor expected, per pass.

File format ``specmd-routing-trace``, version 1 (JSON):

    {"format": "specmd-routing-trace", "version": 1, "model": str,
     "num_layers": L, "num_experts": E, "top_k": k, "lookahead": D, "candidates": C,
     "prompts": [{"tokens": T, "decode": N}, ...],           # how to feed the model to replay it
     "passes": [                                              # one per forward pass, in order
        {"tokens": T, "layers": [                             # one per MoE layer, in order
            {"ids": [T*k ints], "weights": [T*k floats],      # token-major, as the router returned them
             "predicted": [[C ids] * D], "scores": [[C probs] * D]}]}]}

``predicted[j]`` / ``scores[j]`` are the candidates, best first, that this layer's hidden state gives
for MoE layer (l + j + 1) mod L: the routers of the next layers applied to it, probabilities averaged
over the pass's tokens (``Predictor.scores``).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from ..runtime.prefetch import Predictor, PrefetchConfig

FORMAT = "specmd-routing-trace"
VERSION = 1


class TraceRecorder:
    """Collects passes while attached to an engine (``OffloadHandle.record_routing``). Syncs the device
    once more per layer (weights and scores): recording costs time, do not time a recording run."""

    def __init__(self, routers: list, num_experts: int, top_k: int, lookahead: int = 3,
                 candidates: int | None = None, model: str = "") -> None:
        self.num_layers = len(routers)
        self.num_experts = num_experts
        self.top_k = top_k
        self.lookahead = min(lookahead, self.num_layers)
        self.candidates = min(candidates or 2 * top_k, num_experts)
        self.model = model
        self._predictor = Predictor(PrefetchConfig(policy="topk", lookahead=max(1, self.lookahead)), routers, top_k)
        self.passes: list[dict] = []
        self.prompts: list[dict] = []

    def begin_pass(self, num_tokens: int) -> None:
        """A forward pass of ``num_tokens`` tokens starts (changes state)."""
        self.passes.append({"tokens": num_tokens, "layers": []})
        if not self.prompts or num_tokens > 1:  # a multi-token pass is a prefill: a new prompt
            self.prompts.append({"tokens": num_tokens, "decode": 0})
        else:
            self.prompts[-1]["decode"] += 1

    def record(self, layer: int, ids: list[int], weights: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Record one MoE layer of the current pass; syncs the device (``tolist``)."""
        assert len(self.passes[-1]["layers"]) == layer, "layers are recorded in order"
        predicted, scores = self._predictor.scores(layer, hidden_states, self.candidates)
        self.passes[-1]["layers"].append({
            # six decimals, as the scores: full floats tripled a 48-layer trace's size, and nothing reads more
            "ids": list(ids), "weights": [round(w, 6) for w in weights.reshape(-1).float().tolist()],
            "predicted": predicted.tolist(), "scores": [[round(p, 6) for p in row] for row in scores.tolist()],
        })

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "lookahead": self.lookahead,
                "candidates": self.candidates, "prompts": self.prompts, "passes": self.passes}

    def save(self, path: str | Path) -> None:
        """Write the trace as JSON; gzip-compressed when ``path`` ends in ``.gz`` (``load_trace`` reads both)."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        if str(path).endswith(".gz"):
            # mtime=0: the same trace gives the same bytes, so a re-recorded trace diffs as unchanged
            Path(path).write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
        else:
            Path(path).write_text(text)
