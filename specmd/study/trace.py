"""Routing traces: which experts each MoE layer routed to, per forward pass.

Two formats are read, either of them as plain JSON or gzip-compressed (``.json.gz``, known by its magic
bytes, not its name): specmd's own (``recorder.py`` documents it; it also carries the predictor's
candidates), and the onnx-genai export (``shared/traces/granite-3.0-1b-a400m.json``): per prompt, ``prefill``
[T][L][k] and ``decode`` [N][L][k]. A prefill is one forward pass (per layer, the ids of all its tokens);
each decode token is one pass. Prompts are replayed in file order through one cache.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class RoutingTrace:
    """``passes[p][l]``: the expert ids MoE layer ``l`` routed to in forward pass ``p`` (repeats allowed)."""

    num_layers: int
    num_experts: int
    top_k: int
    passes: list[list[list[int]]]
    source: str = ""
    # (prompt tokens, decode passes) per recorded prompt, in order: what to feed a model to replay it
    prompts: tuple[tuple[int, int], ...] = ()
    # predicted[p][l][j]: candidate ids, best first, for layer (l + j + 1) % L; None for ids-only traces
    predicted: list[list[list[list[int]]]] | None = None

    @property
    def lookahead(self) -> int:
        """How many layers ahead the trace recorded predictions (0 for an ids-only trace)."""
        return len(self.predicted[0][0]) if self.predicted and self.predicted[0] else 0

    @property
    def prefill_passes(self) -> list[int]:
        """The index of each prompt's first pass (its prefill), from ``prompts``."""
        starts, p = [], 0
        for _, decode in self.prompts:
            starts.append(p)
            p += 1 + decode
        return starts

    def prefills(self) -> "RoutingTrace":
        """The prompts' prefill passes alone, as prompts with no decode step: what replaying each prompt with
        one new token reads (its predictions kept)."""
        starts = self.prefill_passes
        predicted = [self.predicted[i] for i in starts] if self.predicted is not None else None
        return RoutingTrace(self.num_layers, self.num_experts, self.top_k, [self.passes[i] for i in starts],
                            self.source + " (prefills)", tuple((tokens, 0) for tokens, _ in self.prompts), predicted)

    def head(self, decode: int) -> "RoutingTrace":
        """Every prompt with its prefill and only its first ``decode`` decode passes (predictions kept): the same
        prompts replayed shorter, for a model whose every step copies gigabytes (Mixtral-8x7B at 5%)."""
        if decode < 1:
            raise ValueError(f"keep at least one decode pass per prompt, not {decode}")
        keep = [p for start, (_, steps) in zip(self.prefill_passes, self.prompts)
                for p in range(start, start + 1 + min(decode, steps))]
        predicted = [self.predicted[i] for i in keep] if self.predicted is not None else None
        return RoutingTrace(self.num_layers, self.num_experts, self.top_k, [self.passes[i] for i in keep],
                            f"{self.source} (first {decode} decode steps per prompt)",
                            tuple((tokens, min(decode, steps)) for tokens, steps in self.prompts), predicted)

    def candidates(self, p: int, layer: int, depth: int, k: int) -> list[list[int]]:
        """The first ``k`` candidates the predictor recorded at ``layer`` of pass ``p`` for each of the next
        ``depth`` layers, nearest first (a trace with predictions)."""
        return [ids[:k] for ids in self.predicted[p][layer][:depth]]

    def accesses(self) -> list[list[list[int]]]:
        """Per pass and layer, the distinct ids in ascending order: what the engine makes resident."""
        return [[sorted(set(ids)) for ids in layers] for layers in self.passes]


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a routing trace file, plain or gzip-compressed; a ValueError names the keys a supported format
    needs."""
    raw = Path(path).read_bytes()
    try:
        # large traces ship compressed (a 48-layer trace with predictions is tens of MB of JSON)
        data = json.loads(gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw)
    except (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path}: not a routing trace (not JSON: {err}); pass a file written by 'specmd trace' "
                         "or an onnx-genai routing export") from err
    if isinstance(data, dict) and data.get("format") == "specmd-routing-trace":
        if data.get("version") != 1:
            raise ValueError(f"{path}: specmd-routing-trace version {data.get('version')}; this specmd reads 1")
        passes = [[layer["ids"] for layer in p["layers"]] for p in data["passes"]]
        predicted = [[layer["predicted"] for layer in p["layers"]] for p in data["passes"]]
        prompts = tuple((p["tokens"], p["decode"]) for p in data["prompts"])
        return RoutingTrace(data["num_layers"], data["num_experts"], data["top_k"], passes, str(path), prompts,
                            predicted)
    if not (isinstance(data, dict) and "prompts" in data and "num_layers" in data):
        raise ValueError(f"{path}: not a routing trace; expected format 'specmd-routing-trace', or keys "
                         "num_layers, num_experts, top_k, prompts (onnx-genai export)")
    num_layers = data["num_layers"]
    passes, prompts = [], []
    for name, prompt in data["prompts"].items():
        prefill = prompt.get("prefill", [])
        prompts.append((len(prefill), len(prompt.get("decode", []))))
        if prefill:
            passes.append([[e for token in prefill for e in token[layer]] for layer in range(num_layers)])
        for token in prompt.get("decode", []):
            if len(token) != num_layers:
                raise ValueError(f"{path}: prompt {name!r} has a decode step with {len(token)} layers, "
                                 f"not {num_layers}")
            passes.append([list(ids) for ids in token])
    return RoutingTrace(num_layers, data["num_experts"], data["top_k"], passes, str(path), tuple(prompts))
