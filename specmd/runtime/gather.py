"""Copies of a call's missed experts from the host store into their slots, for the cache decided on the
device: the Triton kernel of ``kernels/miss_gather.py`` on CUDA (it reads pinned host memory directly and
never syncs), plain indexed copies on the CPU (where reading the miss count costs nothing).

On CUDA the kernel reads the store through ``host_words``: each pinned layer buffer seen as a CUDA tensor of
32-bit words at the same address (unified addressing makes a pinned host pointer valid on the device). So
every tensor a decode step touches is a CUDA tensor, which is what lets torch.compile capture the whole step
as a CUDA graph (it skips graphs that read CPU tensors).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from .copier import SlotPool
from .device_cache import Misses
from .store import HostStore


@functools.cache
def _kernel():
    if importlib.util.find_spec("specmd.kernels") is None:
        # A checkout on the path without an install: kernels/ sits beside the package. Registered under its
        # installed name, since torch.compile re-imports the kernel's module by name when it traces the launch.
        root = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location("specmd.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["specmd.kernels"] = package
        spec.loader.exec_module(package)
    try:
        return importlib.import_module("specmd.kernels.miss_gather")
    except ModuleNotFoundError as err:
        if err.name == "triton":
            raise RuntimeError("engine='graph' on CUDA gathers experts with a Triton kernel and this Python has no "
                               "triton; install it (pip install triton) or use engine='threaded'") from err
        raise


class _CudaArray:
    """``__cuda_array_interface__`` of a pinned host buffer as int32 words; holds the buffer alive."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        rows = buffer.shape[0]
        self.__cuda_array_interface__ = {"shape": (rows, buffer[0].numel() * buffer.element_size() // 4),
                                         "typestr": "<i4", "data": (buffer.data_ptr(), False), "version": 3,
                                         "strides": None}


def host_words(buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pinned, contiguous [N, block] ``buffer`` as an [N, words] int32 CUDA tensor at the same address
    (no copy; reads cross the link). The result keeps ``buffer`` alive."""
    if not (buffer.is_pinned() and buffer.is_contiguous() and buffer[0].numel() * buffer.element_size() % 4 == 0):
        raise ValueError("host_words needs a pinned, contiguous buffer of whole 32-bit words per row")
    with torch.cuda.device(device):
        words = torch.as_tensor(_CudaArray(buffer), device=device)
    if words.data_ptr() != buffer.data_ptr():  # torch copied it: the memory was pinned for another device
        raise RuntimeError(f"the host store was pinned for another GPU than {device}, which cannot read it in "
                           "place; offload to the GPU that was current when the model was loaded, or use "
                           "engine='threaded'")
    return words


@torch.library.custom_op("specmd::gather_misses", mutates_args=())
def gather_misses(store: torch.Tensor, pool: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor,
                  count: torch.Tensor, then: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
    """``pool[slots[j]] = store[experts[j]]`` for j < ``count``, then a copy of ``then``. CUDA: ``store`` is
    ``host_words`` of a layer, one kernel launch, no sync; CPU: the layer's buffer, indexed copies.
    ``after`` is not read: passing a tensor orders the op after whatever produced it.

    Declared as mutating nothing, though it writes into ``pool``: the pool is the cache, updated in place
    every layer, and a declared mutation makes torch.compile copy the whole pool once per step (on the
    H200, OLMoE shapes at a 100% budget: 19.8 ms a step, against 7.2 ms declared as it is now). So the
    order must come from data dependencies, which the graph engine gives it: every read of the pool indexes
    it with the returned copy of ``then`` (the layer's slots), so it comes after the copies; and ``after`` is
    the layer's input (the previous layer's output), so the copies come after the previous layer's reads.
    (The routed ids alone would not do: under replay they come from a table, not from the hidden state.)"""
    if pool.is_cuda:
        _kernel().gather_misses(store, pool.view(torch.int32), experts, slots, count)
    else:
        n = int(count)  # free on the CPU; the op is opaque to torch.compile, so no graph break
        pool.index_copy_(0, slots[:n], store[experts[:n]])
    return then.clone()


@gather_misses.register_fake
def _(store, pool, experts, slots, count, then, after):
    return torch.empty_like(then)


class MissGather:
    """``gather(layer, misses, after)``: copy ``misses`` of ``layer`` into the pool, ordered after ``after``, on
    the current stream; returns ``misses.layer_slots`` after the copies (``gather_misses``)."""

    def __init__(self, store: HostStore, pool: SlotPool, device: torch.device) -> None:
        if device.type == "cuda" and not store.pin:
            raise RuntimeError("engine='graph' reads the host store from the GPU, so it must be pinned (CUDA was "
                               "unavailable at load, or pinning failed: see its warning); use engine='threaded'")
        self._pool = pool
        # what the kernel reads each layer through; on CUDA fixed addresses torch.compile must be told of
        self._sources = [host_words(store.layer(i), device) if device.type == "cuda" else store.layer(i)
                         for i in range(store.num_layers)]
        self.tensors = self._sources if device.type == "cuda" else []

    def __call__(self, layer: int, misses: Misses, after: torch.Tensor | None = None) -> torch.Tensor:
        return gather_misses(self._sources[layer], self._pool.data, misses.experts, misses.slots, misses.count,
                             misses.layer_slots, after)
