"""The result document of a bench run: one row per measured configuration, the skips, the machine."""
from __future__ import annotations

import time

import torch

from .config import BenchConfig
from .machine import machine_info
from .timing import Timed

PER_MODEL = ("placement", "reference", "routing", "native_gbps")  # the document's entries keyed by model


def stats_fields(stats) -> dict:
    """The counters of a specmd row (``Stats``), flat, plus the whole snapshot."""
    t = stats.total
    return {"hit_rate": stats.hit_rate, "misses": t.misses, "misses_collision": t.misses_collision,
            "prefetch_hits": t.prefetch_hits, "late_prefetches": t.late_prefetches, "stall_ms": t.stall_ms,
            "copy_busy_ms": stats.copy_busy_ms, "bytes_copied": t.bytes_copied,
            "copy_gbps_achieved": (t.bytes_copied / (stats.copy_busy_ms / 1e3) / 1e9) if stats.copy_busy_ms else None,
            "precision": t.precision, "recall": t.recall, "stats": stats.to_dict()}


def row(model_name: str, kind: str, name: str, workload: tuple[int, int], new_tokens: int, timed: Timed,
        reference: torch.Tensor | None, **extra) -> dict:
    """One result row: the workload, the timing, and whether its tokens equal ``reference``."""
    prompt, batch = workload
    same = None if reference is None else bool(torch.equal(timed.tokens, reference.to(timed.tokens.device)))
    parting = {} if same is not False else {"first_differing_position": first_differing_position(timed.tokens,
                                                                                              reference)}
    return {"model": model_name, "kind": kind, "name": name, "prompt": prompt, "batch": batch,
            "new_tokens": new_tokens, "ttft_ms": timed.ttft_ms, "tpot_ms": timed.tpot_ms,
            "tokens_per_s": timed.tokens_per_s * batch, "peak_vram_bytes": timed.peak_vram_bytes,
            "identical_tokens": same, **parting, **extra}


def distinct_outputs(outputs) -> list[torch.Tensor]:
    """The different token sequences among ``outputs``, in first-seen order."""
    distinct: list[torch.Tensor] = []
    for tokens in outputs:
        if not any(torch.equal(tokens, seen) for seen in distinct):
            distinct.append(tokens)
    return distinct


def unmatched_outputs(outputs, references) -> list[torch.Tensor]:
    """Those of ``outputs`` that equal none of ``references``, in order: the check of a row against a reference
    model whose own generates differed (a compiled decode step is not reproducible run to run in bf16)."""
    return [out for out in outputs if not any(torch.equal(out, ref) for ref in references)]


def first_differing_position(tokens: torch.Tensor, reference: torch.Tensor) -> int | None:
    """The first sequence position (prompt included) where any sequence of ``tokens`` leaves ``reference``; None
    when the shapes differ. Where to look: whether the reference's top two logits there are a near tie (rounding)
    or not (a wrong result) takes the logits (``benchmarks/graph_numerics.py``)."""
    if tokens.shape != reference.shape:
        return None
    differs = (tokens != reference.to(tokens.device)).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else None


class Results:
    """The result document: rows and skips, written out (``on_row``) after every row."""

    def __init__(self, config: BenchConfig, device: torch.device, log, on_row) -> None:
        self.doc = {"machine": machine_info(device), "config": dict(vars(config)), "rows": [], "skipped": [],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.log, self._on_row = log, on_row

    def add(self, result: dict) -> None:
        self.doc["rows"].append(result)
        if self._on_row is not None:
            self._on_row(self.doc)

    def skip(self, why: str) -> None:
        self.log(f"skip: {why}")
        self.doc["skipped"].append(why)

    def note(self, what: str) -> None:
        """Something a reader of the rows must know that is not a row (e.g. an unreproducible reference)."""
        self.log(f"note: {what}")
        self.doc.setdefault("notes", []).append(what)

    def per_model(self, key: str, model_name: str, value) -> None:
        assert key in PER_MODEL, key
        self.doc.setdefault(key, {})[model_name] = value


def _routing_of(config: dict) -> dict:
    """A config's routing per model: its mapping, or its one setting (e.g. "random") for each of its models;
    a model the mapping leaves out runs on its own routers."""
    routing = config.get("routing")
    if isinstance(routing, dict):
        return dict(routing)
    return {model: routing for model in config.get("models", [])} if routing is not None else {}


def merge_results(parts: list[dict]) -> dict:
    """One result document from the parts of a matrix run as separate processes (a device call's time limit
    cuts a long matrix by budget): every part's rows, a baseline without a budget (full GPU) once, from the
    first part that measured it; the config's lists and per-model entries joined (parts may run different
    models); each part's run (start, native copy rate, budgets) kept under ``parts``, since their machines'
    states differ."""
    if not parts:
        raise ValueError("merge_results needs at least one result document")
    merged = {key: value for key, value in parts[0].items() if key not in ("rows", "skipped", "notes")}
    merged["config"] = dict(parts[0]["config"])
    merged["rows"], merged["skipped"], seen = [], [], set()
    for part in parts:
        for key in ("models", "budgets", "baselines", "presets", "links"):
            merged["config"][key] = list(dict.fromkeys([*merged["config"].get(key, []), *part["config"].get(key, [])]))
        if "routing" in part["config"]:  # per model, a model's first part first
            merged["config"]["routing"] = {**_routing_of(part["config"]), **_routing_of(merged["config"])}
        for key in PER_MODEL:
            if isinstance(part.get(key), dict):
                merged[key] = {**part[key], **merged.get(key, {})}
        for r in part["rows"]:
            once = (r["model"], r["name"], r["prompt"], r["batch"]) if r["kind"] == "baseline" and not r.get("budget") \
                else None
            if once in seen:
                continue
            if once is not None:
                seen.add(once)
            merged["rows"].append(r)
        merged["skipped"] += part["skipped"]
        if part.get("notes"):
            merged["notes"] = merged.get("notes", []) + part["notes"]
    merged["parts"] = [{"started": p.get("started"), "budgets": p["config"].get("budgets", []),
                        "native_gbps": p.get("native_gbps")} for p in parts]
    return merged
