"""Model knowledge: which modules of a Hugging Face model are its fused MoE experts, and their layout.

Every family listed in ``SUPPORTED_FAMILIES`` keeps its routed experts in one ``...Experts`` module decorated
with ``transformers.integrations.moe.use_experts_implementation``: fused 3D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]; GPT-OSS transposed, interleaved and with biases) and a forward called
right after the router. Routers, shared experts, attention and norms live outside that module and stay on
the device untouched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# model_type -> display name. Tested token-for-token in tests/test_families.py.
SUPPORTED_FAMILIES: dict[str, str] = {
    "olmoe": "OLMoE",
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3",
    "gpt_oss": "GPT-OSS",
    "granitemoe": "Granite-MoE",
    "granitemoeshared": "GraniteMoeShared",
    "phimoe": "Phi-MoE",
}

# model_type -> its transformers config class (how a model file of configs/models/ is built).
CONFIG_CLASSES: dict[str, str] = {
    "olmoe": "OlmoeConfig",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "deepseek_v2": "DeepseekV2Config",
    "deepseek_v3": "DeepseekV3Config",
    "gpt_oss": "GptOssConfig",
    "granitemoe": "GraniteMoeConfig",
    "granitemoeshared": "GraniteMoeSharedConfig",
    "phimoe": "PhimoeConfig",
}


@dataclass(frozen=True)
class CheckpointNames:
    """How a family's published checkpoints name tensors where the model's names differ (what transformers'
    checkpoint conversion mapping undoes at load): ``renames`` (regex, replacement), applied in order to
    every name, then per-expert tensors ``<experts>.E.<gate|up|down>.weight``, which transformers fuses:
    gate and up stacked into ``gate_up_proj[E]`` (gate rows first), down into ``down_proj[E]``. A
    checkpoint already in the model's fused layout (what transformers 5 keeps in memory) needs none of it."""

    renames: tuple[tuple[str, str], ...] = ()
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


_GRANITE_NAMES = CheckpointNames(renames=((r"\.block_sparse_moe\.input_linear\.weight$",
                                           ".block_sparse_moe.experts.gate_up_proj"),
                                          (r"\.block_sparse_moe\.output_linear\.weight$",
                                           ".block_sparse_moe.experts.down_proj"),
                                          (r"\.router\.layer\.", ".router.")))
# model_type -> its checkpoint names; the families absent here use CheckpointNames() (gate_proj/up_proj/down_proj
# per expert, or the fused layout). Tested per family in tests/test_loader.py against transformers' own load.
CHECKPOINT_NAMES: dict[str, CheckpointNames] = {
    "mixtral": CheckpointNames(renames=((r"\.block_sparse_moe\.", ".mlp."),), gate="w1", up="w3", down="w2"),
    "phimoe": CheckpointNames(renames=((r"\.block_sparse_moe\.gate\.", ".mlp.router."),
                                       (r"\.block_sparse_moe\.", ".mlp.")), gate="w1", up="w3", down="w2"),
    "granitemoe": _GRANITE_NAMES,
    "granitemoeshared": _GRANITE_NAMES,
}


def family_config(family: str, **kwargs):
    """A transformers config of ``family`` (a key of ``SUPPORTED_FAMILIES``) built from ``kwargs``."""
    import transformers

    if family not in CONFIG_CLASSES:
        raise UnsupportedModelError(f"unknown family {family!r}; choose one of: {', '.join(CONFIG_CLASSES)}")
    return getattr(transformers, CONFIG_CLASSES[family])(**kwargs)


# Each sub-tensor of an expert's block starts on this many elements, so slot views stay aligned
# for vectorised kernels and grouped_mm's 16-byte stride rule.
_ALIGN_ELEMENTS = 64


class UnsupportedModelError(ValueError):
    """The model has no MoE block specmd can offload."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert of a fused experts module is laid out in a contiguous block.

    ``names[i]`` is a fused parameter of shape [E, *shapes[i]]; its expert ``e`` occupies
    ``block[offsets[i] : offsets[i] + numel(shapes[i])]``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    block_numel: int
    num_experts: int
    dtype: torch.dtype
    is_transposed: bool
    has_bias: bool

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert takes in a slot (alignment padding included)."""
        return self.block_numel * self.dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.expert_bytes * self.num_experts


@dataclass(frozen=True)
class MoELayer:
    """One fused experts module: ``index`` counts MoE layers only (dense layers are skipped)."""

    index: int
    name: str
    module: nn.Module
    layout: ExpertLayout
    router: nn.Module | None = None  # its ``weight`` [E, H] scores hidden states; used to speculate


def _router_of(model: nn.Module, name: str, num_experts: int) -> nn.Module | None:
    # Every supported family keeps its router beside the experts (``gate`` or ``router``), with the
    # logits' weight as ``weight`` [E, H].
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    for child_name in ("gate", "router"):
        child = getattr(parent, child_name, None)
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return child
    return None


def _is_experts_module(module: nn.Module) -> bool:
    # use_experts_implementation sets these flags in __init__; no other module has all of them.
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts"))


def _layout_of(name: str, module: nn.Module) -> ExpertLayout:
    if not module.has_gate or getattr(module, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}): experts without a gate or with a post-expert norm are not "
            "supported yet; supported families: " + ", ".join(SUPPORTED_FAMILIES.values())
        )
    if getattr(module, "_is_expert_parallel", False):
        raise UnsupportedModelError(f"{name}: expert-parallel models cannot be offloaded; load without tp_plan")
    names = ["gate_up_proj", "down_proj"]
    if module.has_bias:
        names += ["gate_up_proj_bias", "down_proj_bias"]
    params = [getattr(module, n) for n in names]
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise UnsupportedModelError(f"{name}: expert tensors mix dtypes {sorted(map(str, dtypes))}; cast the model first")
    num_experts = params[0].shape[0]
    shapes, offsets, cursor = [], [], 0
    for p in params:
        shapes.append(tuple(p.shape[1:]))
        offsets.append(cursor)
        cursor += -(-p[0].numel() // _ALIGN_ELEMENTS) * _ALIGN_ELEMENTS
    return ExpertLayout(tuple(names), tuple(shapes), tuple(offsets), cursor, num_experts,
                        params[0].dtype, bool(module.is_transposed), bool(module.has_bias))


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Return the model's fused experts modules in execution order; raise if there are none."""
    found = [(n, m) for n, m in model.named_modules() if _is_experts_module(m)]
    families = ", ".join(SUPPORTED_FAMILIES.values())
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not found:
        raise UnsupportedModelError(
            f"{model_type!r} has no MoE experts module specmd can offload; supported families: {families}"
        )
    if model_type not in SUPPORTED_FAMILIES:
        log.warning("%s is not a tested family (%s); offloading its experts modules anyway", model_type, families)
    layers = [MoELayer(i, n, m, layout, _router_of(model, n, layout.num_experts))
              for i, (n, m) in enumerate(found) for layout in [_layout_of(n, m)]]
    first = layers[0].layout
    for layer in layers[1:]:
        if (layer.layout.shapes, layer.layout.dtype) != (first.shapes, first.dtype):
            raise UnsupportedModelError(f"{layer.name}: experts differ in shape from {layers[0].name}; "
                                        "one slot pool needs one expert shape")
    return layers
