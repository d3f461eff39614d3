"""Shared by the GPU benchmark scripts: the OLMoE-1B-7B shapes and CUDA-synchronised generate timing."""
from __future__ import annotations

import statistics
import time

import torch

from specmd.costmodel import ModelSpec

# OLMoE-1B-7B-0924 shapes, from configs/models/ (OlmoeConfig() defaults differ: intermediate 2048).
OLMOE_1B_7B = ModelSpec.load("olmoe-1b-7b-0924").config


def olmoe_on_gpu(seed: int = 0):
    """The OLMoE-shaped model with random bf16 weights, initialised directly on the GPU."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(seed)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(OlmoeConfig(**OLMOE_1B_7B), dtype=torch.bfloat16).eval()


def timed_generate(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate (synchronised before and after) and its output."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(model, ids, new_tokens: int, repeats: int, ttft_repeats: int = 3, before_last=None) -> dict:
    """TTFT (generate of one token) and TPOT ((t_n - t_1) / (n - 1)), medians after a full-length warm-up.

    ``before_last`` runs before the last full repeat (e.g. to reset counters so they cover one generate).
    """
    # Full length: the 2026-11-23 prefetch run warmed up with 8 tokens and its full-GPU row came out
    # suspiciously slow (README); a warm-up that covers every decode length rules that out.
    timed_generate(model, ids, new_tokens)
    ttft = statistics.median(timed_generate(model, ids, 1)[0] for _ in range(ttft_repeats))
    totals, out = [], None
    for i in range(repeats):
        if i == repeats - 1 and before_last is not None:
            before_last()
        seconds, out = timed_generate(model, ids, new_tokens)
        totals.append(seconds)
    total = statistics.median(totals)
    return {"ttft_ms": ttft * 1e3, "tpot_ms": (total - ttft) / (new_tokens - 1) * 1e3, "tokens": out}
