"""Host store: every routed expert in host memory, one contiguous block per (layer, expert).

Each MoE layer owns one buffer [E, block] (pinned when the experts go to a CUDA device, so copies are
asynchronous and run at full link speed: pinned in place once written, ``pinning.py``); a row is one expert,
so one copy moves one expert. The experts module's fused parameters are replaced by strided views of that
buffer: the model still sees its weights (``state_dict``, ``save_pretrained``), but no second copy of them
exists.
"""
from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from . import pinning
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
    """Owns the host buffers; read-only once filled (eviction never copies back).

    Pinning: where ``device`` (the device the experts are copied to) is a CUDA device, each buffer is allocated
    pageable and pinned in place for it by ``submit_pin`` / ``wait_pinned`` (``pinning.py``); ``pin`` is True
    while every buffer asked so far is (or is being) pinned, and turns False, with one warning, at the first
    failure: later buffers stay pageable. For a CPU device (or None) the buffers are plain memory."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self.pin = device is not None and device.type == "cuda"  # a CPU model copies nothing to a GPU
        self.pin_seconds = 0.0  # time spent registering buffers (on the pinning thread, much of it overlapped)
        self._buffers: list[torch.Tensor] = []  # layer -> [E, block]
        self._owners: list = []  # layer -> the array owning its pageable memory, until submitted for pinning
        self._pinner: pinning.Pinner | None = None
        self._lock = threading.Lock()  # submit_pin is called from the checkpoint reader's threads

    def add_layer(self, layer: MoELayer, copy: bool = True) -> None:
        """Move ``layer``'s experts into a new host buffer and point its parameters at it (changes the module).
        ``copy=False`` leaves the buffer unwritten and unpinned (the parameters may be on the meta device): the
        caller fills it through the module's parameters, e.g. by the model's own initialisation, and pins it
        with ``submit_pin``."""
        assert layer.index == len(self._buffers), "layers are added in order"
        layout, module = layer.layout, layer.module
        with torch.inference_mode(False):  # normal tensors, whatever mode offload is called in
            buffer = self._allocate(layout.num_experts, layout.block_numel, layout.dtype)
            self._buffers.append(buffer)
            if copy:  # pinned first: a copy from the device then runs at link speed, not staged by the driver
                self.submit_pin(layer.index)
                self.wait_pinned()
            for name, view in layout_views(buffer, layout).items():
                if copy:
                    view.copy_(getattr(module, name).detach())
                # Replacing the parameter frees the original (device or host) tensor right away.
                setattr(module, name, nn.Parameter(view, requires_grad=False))
        if not getattr(module, "_specmd_state_dict_hook", False):
            module.register_state_dict_post_hook(_contiguous_experts)
            module._specmd_state_dict_hook = True

    def _allocate(self, rows: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, numel] host buffer, unwritten: while pinning works, an untouched mapping that ``submit_pin``
        pins in place; else plain memory. Called on the loading thread: the pinning thread starts here, before
        any reader can submit (``pinning.Pinner``)."""
        if self.pin:
            with self._lock:
                self._start_pinner()
        if self.pin:
            memory, owner = pinning.pageable(rows * numel * dtype.itemsize)
            self._owners.append(owner)
            return memory.view(dtype).view(rows, numel)
        self._owners.append(None)
        return torch.empty(rows, numel, dtype=dtype)

    def _start_pinner(self) -> None:
        """A pinner for ``device`` unless one runs (the lock held); where CUDA cannot start, pinning is off."""
        if self._pinner is not None or not self.pin:
            return
        try:
            self._pinner = pinning.Pinner(self.device)
        except Exception as err:  # no usable CUDA runtime: every cause means the same fallback
            self._pin_failed(0, f"{type(err).__name__}: {err}",
                             f"CUDA could not start on {self.device}: check the driver (nvidia-smi) and that "
                             "torch.cuda.init() works in this environment")

    def submit_pin(self, layer: int) -> None:
        """Start pinning ``layer``'s buffer in place (returns at once; thread-safe; a second call for the same
        layer, or a call while ``pin`` is False, does nothing). Nothing may write the buffer until
        ``wait_pinned`` returns, unless it was written before this call."""
        with self._lock:
            owner = self._owners[layer]
            if not self.pin or owner is None:
                return
            self._owners[layer] = None
            self._start_pinner()  # only after a wait_pinned that ended the one _allocate started
            if self._pinner is not None:
                self._pinner.submit(owner)

    def wait_pinned(self) -> None:
        """Wait until every buffer submitted by ``submit_pin`` is pinned; where one failed, ``pin`` is now
        False (with one warning). Safe to call twice."""
        with self._lock:
            pinner, self._pinner = self._pinner, None
        if pinner is None:
            return
        failure = pinner.wait()
        self.pin_seconds += pinner.busy_seconds
        if failure is not None:
            self._pin_failed(*failure)

    def _pin_failed(self, nbytes: int, cause: str, fix: str) -> None:
        """The first failure turns pinning off for good: a late crash would lose the whole load."""
        if not self.pin:
            return
        self.pin = False
        size = f"{nbytes / 2**30:.2f} GiB of host memory" if nbytes else "host memory"
        log.warning("specmd: pinning %s failed (%s); the experts go to pageable memory from here on: "
                    "host->device copies are staged by the driver and run several times slower, and "
                    "engine='graph' cannot run (it reads pinned memory from the GPU). %s",
                    size, cause.splitlines()[0], fix)

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
