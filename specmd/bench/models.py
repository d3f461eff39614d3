"""The benchmark's models: real shapes (configs/models/) with random bf16 weights, built where they fit."""
from __future__ import annotations

import torch

from ..runtime.adapters import find_moe_layers
from ..study.costmodel import ModelSpec
from .machine import host_memory_bytes

# Device memory kept free when deciding whether a model fits (activations, KV cache, allocator slack).
FIT_HEADROOM_BYTES = 6 * 2**30


def _on_meta(spec: ModelSpec):
    """(transformers config, the model on the meta device in bf16: nothing allocated, its MoE layers)."""
    from transformers import AutoModelForCausalLM

    config = spec.transformers_config()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return config, meta, find_moe_layers(meta)


def sizes_on_meta(spec: ModelSpec) -> tuple[object, int, int, int]:
    """(transformers config, all weight bytes, expert bytes, one expert's bytes) in bf16, from a meta model."""
    config, meta, layers = _on_meta(spec)
    layout = layers[0].layout
    total = sum(p.numel() * p.element_size() for p in meta.parameters())
    return config, total, layout.layer_bytes * len(layers), layout.expert_bytes


def moe_topology(spec: ModelSpec) -> tuple[int, int, int]:
    """(MoE layers, experts per layer, top-k) of the model, from a meta model (nothing allocated)."""
    config, _, layers = _on_meta(spec)
    return len(layers), layers[0].layout.num_experts, config.num_experts_per_tok


def build_model(spec: ModelSpec, device: torch.device, seed: int = 0, place: str | None = None):
    """(model, placement) with random bf16 weights, initialised where they belong: placement "device", the
    whole model on ``device`` when it fits (the full-GPU baselines can run), else "host": non-expert
    weights on ``device`` and the experts in the host store (``specmd.from_config``; offloaded once and
    closed, so each run offloads it again without copying). ``place`` forces one (tests). Raises
    ``Skip`` when neither fits."""
    from transformers import AutoModelForCausalLM

    import specmd

    config, nbytes, expert_bytes, one_expert = sizes_on_meta(spec)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    try:
        host = host_memory_bytes()
    except (ValueError, OSError):
        host = None
    gib = 2**30
    if place is None:
        place = "device" if free is None or nbytes + FIT_HEADROOM_BYTES <= free else "host"
    if place == "device" and host is not None and nbytes * 1.2 > host:  # offload pins a copy of the experts
        raise Skip(f"{spec.name}: {nbytes / gib:.1f} GiB of weights do not fit {host / gib:.1f} GiB of host memory")
    if place == "host":
        if free is not None and nbytes - expert_bytes + FIT_HEADROOM_BYTES > free:
            raise Skip(f"{spec.name}: its {(nbytes - expert_bytes) / gib:.1f} GiB of non-expert weights do not "
                       f"fit the device's {free / gib:.1f} GiB free")
        if host is not None and expert_bytes * 1.1 > host:
            raise Skip(f"{spec.name}: {expert_bytes / gib:.1f} GiB of experts do not fit {host / gib:.1f} GiB of "
                       "host memory")
        model = specmd.from_config(config, one_expert, device=str(device), seed=seed, progress=True)
        model.specmd.close()
        return model, place
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval(), place


class Skip(Exception):
    """A configuration that does not fit this machine; reported, not run."""
