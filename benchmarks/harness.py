"""Shared by the GPU benchmark scripts: the OLMoE-1B-7B shapes and CUDA-synchronised generate timing."""
from __future__ import annotations

import torch

from specmd import benchrun
from specmd.benchrun import timed_generate  # noqa: F401 - re-exported for the scripts
from specmd.costmodel import ModelSpec


def olmoe_on_gpu(seed: int = 0):
    """The OLMoE-1B-7B-shaped model (configs/models/) with random bf16 weights, initialised directly on
    the GPU (``benchrun.build_model``)."""
    return benchrun.build_model(ModelSpec.load("olmoe-1b-7b-0924"), torch.device("cuda", 0), seed,
                                place="device")[0]


def measure(model, ids, new_tokens: int, repeats: int, ttft_repeats: int = 3, before_last=None) -> dict:
    """``specmd.benchrun.measure`` (full-length warm-up) as the dict the scripts print."""
    timed = benchrun.measure(model, ids, new_tokens, repeats, ttft_repeats, before_last)
    return {"ttft_ms": timed.ttft_ms, "tpot_ms": timed.tpot_ms, "tokens": timed.tokens}
