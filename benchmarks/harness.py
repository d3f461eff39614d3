"""Shared by the GPU benchmark scripts: the OLMoE-1B-7B shapes and CUDA-synchronised generate timing."""
from __future__ import annotations

import torch

from specmd import benchrun
from specmd.benchrun import timed_generate  # noqa: F401 - re-exported for the scripts
from specmd.costmodel import ModelSpec

# OLMoE-1B-7B-0924 shapes, from configs/models/ (OlmoeConfig() defaults differ: intermediate 2048).
OLMOE_1B_7B = ModelSpec.load("olmoe-1b-7b-0924").config


def olmoe_on_gpu(seed: int = 0):
    """The OLMoE-shaped model with random bf16 weights, initialised directly on the GPU."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(seed)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(OlmoeConfig(**OLMOE_1B_7B), dtype=torch.bfloat16).eval()


def measure(model, ids, new_tokens: int, repeats: int, ttft_repeats: int = 3, before_last=None) -> dict:
    """``specmd.benchrun.measure`` (full-length warm-up) as the dict the scripts print."""
    timed = benchrun.measure(model, ids, new_tokens, repeats, ttft_repeats, before_last)
    return {"ttft_ms": timed.ttft_ms, "tpot_ms": timed.tpot_ms, "tokens": timed.tokens}
