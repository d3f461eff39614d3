"""Like with like: how a benchmark puts transformers' decode step in the mode of the rows it is compared with.

On CUDA the graph engine's ``generate`` runs each decode step as one CUDA graph: a static KV cache, with which
transformers compiles the step (its default CompileConfig, mode "reduce-overhead"). Compiled steps round
differently from eager ones in bf16, so such a row's tokens are checked against the full-GPU model compiled
the same way, and an uncompiled row against the uncompiled model.
"""
from __future__ import annotations

import torch
import torch._dynamo


def decode_mode(model, compiled: bool, cache_len: int | None = None) -> None:
    """Compiled: generate with a static cache (of ``cache_len`` positions at least, else sized by each call),
    which makes it compile the decode step; else uncompiled, with the dynamic cache of the uncompiled full-GPU
    row."""
    model.generation_config.cache_implementation = "static" if compiled else None
    model.generation_config.max_cache_len = cache_len if compiled else None
    model.generation_config.disable_compile = not compiled


def default_decode_mode(model) -> None:
    """Back to what a fresh model does: no cache chosen, compilation allowed (so an offload with the graph engine
    may choose the static cache itself)."""
    model.generation_config.cache_implementation = None
    model.generation_config.max_cache_len = None
    model.generation_config.disable_compile = False


def fresh_compile(model) -> None:
    """Forget every compiled graph: a new offload must not count against dynamo's recompile limit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_cache", None)
    model.__dict__.pop("_previous_max_cache_length", None)  # the next static cache is sized afresh


def captures_decode(model) -> bool:
    """Whether ``model``'s specmd offload runs decode steps as CUDA graphs (the graph engine on CUDA, slots
    enough for one token's experts): its tokens are then compiled tokens."""
    handle = getattr(model, "specmd", None)
    return bool(getattr(handle, "set_static_cache", False))
