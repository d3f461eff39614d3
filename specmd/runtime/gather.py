"""Copies of a call's missed experts from the host store into their slots, for the cache decided on the
device: the Triton kernel of ``kernels/miss_gather.py`` on CUDA (it reads pinned host memory directly and
never syncs), plain indexed copies on the CPU (where reading the miss count costs nothing).

On CUDA the kernel reads the store through ``host_words``: each pinned layer buffer seen as a CUDA tensor of
32-bit words at the same address (unified addressing makes a pinned host pointer valid on the device). So
every tensor a decode step touches is a CUDA tensor, which is what lets torch.compile capture the whole step
as a CUDA graph (it skips graphs that read CPU tensors).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .copier import SlotPool
from .device_cache import Gather, Misses
from .store import HostStore


def _kernel():
    try:
        return importlib.import_module("specmd.kernels.miss_gather")
    except ModuleNotFoundError as err:
        if err.name == "triton":
            raise RuntimeError("engine='graph' on CUDA gathers experts with a Triton kernel and this Python has no "
                               "triton; install it (pip install triton) or use engine='threaded'") from err
        # a checkout on the path without an install: kernels/ sits beside the package
        path = Path(__file__).resolve().parents[2] / "kernels" / "miss_gather.py"
        spec = importlib.util.spec_from_file_location("specmd.kernels.miss_gather", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


class _CudaArray:
    """``__cuda_array_interface__`` of a pinned host buffer as int32 words; holds the buffer alive."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        rows = buffer.shape[0]
        self.__cuda_array_interface__ = {"shape": (rows, buffer[0].numel() * buffer.element_size() // 4),
                                         "typestr": "<i4", "data": (buffer.data_ptr(), True), "version": 3,
                                         "strides": None}


def host_words(buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pinned, contiguous [N, block] ``buffer`` as an [N, words] int32 CUDA tensor at the same address
    (no copy; reads cross the link). The result keeps ``buffer`` alive."""
    if not (buffer.is_pinned() and buffer.is_contiguous() and buffer[0].numel() * buffer.element_size() % 4 == 0):
        raise ValueError("host_words needs a pinned, contiguous buffer of whole 32-bit words per row")
    with torch.cuda.device(device):
        return torch.as_tensor(_CudaArray(buffer), device=device)


class CudaGather:
    """The CUDA gather: one kernel launch per call, reading the store through ``host_words``."""

    def __init__(self, store: HostStore, pool: SlotPool, device: torch.device) -> None:
        if not store.pin:
            raise RuntimeError("engine='graph' reads the host store from the GPU, so it must be pinned; "
                               "offload with CUDA available")
        self._kernel = _kernel().gather_misses
        self._pool = pool
        self.tensors = [host_words(store.layer(i), device) for i in range(store.num_layers)]  # fixed addresses

    def __call__(self, layer: int, misses: Misses) -> None:
        self._kernel(self.tensors[layer], self._pool.data.view(torch.int32), misses.experts, misses.slots,
                     misses.count)


def make_gather(store: HostStore, pool: SlotPool, device: torch.device) -> Gather:
    """``gather(layer, misses)``: copy ``misses`` of ``layer`` into the pool, on the current stream."""
    if device.type == "cuda":
        return CudaGather(store, pool, device)

    def host_gather(layer: int, misses: Misses) -> None:
        if torch.compiler.is_compiling():  # traced: no read of the count; the unused entries copy a slot onto itself
            source = torch.where(misses.valid.unsqueeze(-1), store.layer(layer)[misses.experts],
                                 pool.data[misses.slots])
            pool.data.index_copy_(0, misses.slots, source)
            return
        count = int(misses.count)  # free on the CPU
        pool.data.index_copy_(0, misses.slots[:count], store.layer(layer)[misses.experts[:count]])

    return host_gather
