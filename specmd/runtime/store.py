"""Host store: every routed expert in host memory, one contiguous block per (layer, expert).

Each MoE layer owns one buffer [E, block] (pinned when CUDA is available, so copies are asynchronous
and run at full link speed); a row is one expert, so one copy moves one expert. The experts module's
fused parameters are replaced by strided views of that buffer: the model still sees its weights
(``state_dict``, ``save_pretrained``), but no second copy of them exists.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .adapters import ExpertLayout, MoELayer

log = logging.getLogger(__name__)


def layout_views(buffer: torch.Tensor, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """Views of a [N, block] buffer as the fused tensors [N, *shape], one per name of ``layout``."""
    views = {}
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets):
        numel = torch.Size(shape).numel()
        views[name] = buffer[:, offset:offset + numel].view(buffer.shape[0], *shape)
    return views


def _contiguous_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # Savers (safetensors) need contiguous tensors; the strided host views are copied only when saving.
    for key, value in state_dict.items():
        if key.startswith(prefix) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


class HostStore:
    """Owns the host buffers; read-only once filled (eviction never copies back)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: list[torch.Tensor] = []  # layer -> [E, block]

    def add_layer(self, layer: MoELayer, copy: bool = True) -> None:
        """Move ``layer``'s experts into a new host buffer and point its parameters at it (changes the module).
        ``copy=False`` leaves the buffer unwritten (the parameters may be on the meta device): the caller
        fills it through the module's parameters, e.g. by the model's own initialisation."""
        assert layer.index == len(self._buffers), "layers are added in order"
        layout, module = layer.layout, layer.module
        with torch.inference_mode(False):  # normal tensors, whatever mode offload is called in
            buffer = self._allocate(layout.num_experts, layout.block_numel, layout.dtype)
            for name, view in layout_views(buffer, layout).items():
                if copy:
                    view.copy_(getattr(module, name).detach())
                # Replacing the parameter frees the original (device or host) tensor right away.
                setattr(module, name, nn.Parameter(view, requires_grad=False))
        if not getattr(module, "_specmd_state_dict_hook", False):
            module.register_state_dict_post_hook(_contiguous_experts)
            module._specmd_state_dict_hook = True
        self._buffers.append(buffer)

    def _allocate(self, rows: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, numel] host buffer, pinned while pinning works; after the first failure (a locked-memory
        limit, too little RAM) pageable, with one warning: a late crash would lose the whole load."""
        if self.pin:
            try:
                return torch.empty(rows, numel, dtype=dtype, pin_memory=True)
            except RuntimeError as err:
                self.pin = False
                log.warning("specmd: pinning %.2f GiB of host memory failed (%s); the experts go to pageable memory "
                            "from here on: host->device copies are staged by the driver and run several times "
                            "slower, and engine='graph' cannot run (it reads pinned memory from the GPU). Raise the "
                            "locked-memory limit (ulimit -l) or free host memory to pin them",
                            rows * numel * dtype.itemsize / 2**30, str(err).splitlines()[0])
        return torch.empty(rows, numel, dtype=dtype)

    def fill_random(self, layer: MoELayer, std: float, device: torch.device, chunk_bytes: int = 256 * 2**20) -> None:
        """Fill ``layer``'s experts as transformers initialises them, N(0, std) weights and zero biases,
        drawn on ``device`` in chunks of rows and copied in: a CPU draws about 0.3 GB/s per core, a GPU
        fills GiBs in a second. Deterministic under ``torch.manual_seed``."""
        buffer = self._buffers[layer.index]
        rows = max(1, chunk_bytes // (buffer.shape[1] * buffer.element_size()))
        with torch.inference_mode(False):
            for start in range(0, buffer.shape[0], rows):
                chunk = buffer[start:start + rows]
                chunk.copy_(torch.empty(chunk.shape, dtype=chunk.dtype, device=device).normal_(0.0, std))
            for name, view in layout_views(buffer, layer.layout).items():
                if name.endswith("_bias"):
                    view.zero_()

    def layer(self, layer: int) -> torch.Tensor:
        """The [E, block] buffer of one MoE layer (read-only)."""
        return self._buffers[layer]

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """The contiguous 1-D block of one expert."""
        return self._buffers[layer][expert]

    @property
    def num_layers(self) -> int:
        return len(self._buffers)

    @property
    def total_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)
