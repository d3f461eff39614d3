"""The baseline a user would reach for without specmd: accelerate's ``device_map="auto"``."""
from __future__ import annotations

import torch

from ..config import Budget
from .machine import host_memory_bytes
from .results import row
from .timing import measure

# device_map="auto" moves every offloaded weight on every forward (seconds per token at small budgets):
# it is timed over fewer tokens, one repeat, a one-token warm-up.
DEVICE_MAP_NEW_TOKENS = 4


def device_map_auto(bench) -> None:
    """accelerate's placement with max_memory = non-expert weights + the expert budget, per budget, on the
    model of ``bench`` (a ``runner.ModelBench``). Rebuilds the model's placement: the last run on a model."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    model, device = bench.model, bench.device
    handle = getattr(model, "specmd", None)
    model.set_experts_implementation(handle.implementation if handle is not None else "grouped_mm")
    model.to("cpu")
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    non_expert = total_bytes - bench.total_expert_bytes
    index = device.index if device.index is not None else torch.cuda.current_device()
    for budget in bench.config.budgets:
        budget_bytes = Budget.parse(budget).resolve(bench.total_expert_bytes, expert_bytes=bench.expert_bytes)
        vram = non_expert + budget_bytes
        device_map = infer_auto_device_map(model, max_memory={index: vram, "cpu": host_memory_bytes()},
                                           no_split_module_classes=model._no_split_modules)
        on_gpu = sum(1 for d in device_map.values() if d == index)
        dispatch_model(model, device_map=device_map, main_device=index)
        try:
            for workload, ids in bench.workloads.items():
                timed = measure(model, ids, DEVICE_MAP_NEW_TOKENS, 1, ttft_repeats=1, warmup_tokens=1)
                reference = bench.reference[workload][:, :ids.shape[1] + DEVICE_MAP_NEW_TOKENS]
                bench.results.add(row(bench.name, "baseline", "device-map-auto", workload, DEVICE_MAP_NEW_TOKENS,
                                      timed, reference, budget=str(budget), budget_bytes=budget_bytes,
                                      max_memory_bytes=vram, modules_on_gpu=on_gpu))
        finally:
            remove_hook_from_submodules(model)
            model.to("cpu")
        bench.results.log(f"device_map=auto at {budget}: {on_gpu} of {len(device_map)} placed modules on the GPU")
