"""Where transformers calls into specmd: the experts implementation registered under ``IMPLEMENTATION_NAME``,
and the binding each offloaded experts module carries to its engine and MoE layer index."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

IMPLEMENTATION_NAME = "specmd"


class ClosedHandleError(RuntimeError):
    """The offload handle was closed."""


class LayerRunner(Protocol):
    """What an engine offers the experts modules it is bound to."""

    def run_layer(self, layer: int, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Binding:
    """Attached to each experts module at install time: which engine runs it, as which MoE layer."""

    engine: LayerRunner
    layer: int


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation registered with transformers under ``IMPLEMENTATION_NAME``."""
    binding = getattr(module, "_specmd_binding", None)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} uses the '{IMPLEMENTATION_NAME}' experts implementation "
                           "but was not offloaded; call specmd.offload(model, ...)")
    return binding.engine.run_layer(binding.layer, module, hidden_states, top_k_index, top_k_weights)
