"""Copies of a call's missed experts from the host store into their slots, for the cache decided on the
device: the Triton kernel of ``kernels/miss_gather.py`` on CUDA (it reads pinned host memory directly and
never syncs), plain indexed copies on the CPU (where reading the miss count costs nothing)."""
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


def make_gather(store: HostStore, pool: SlotPool, device: torch.device) -> Gather:
    """``gather(layer, misses)``: copy ``misses`` of ``layer`` into the pool, on the current stream."""
    if device.type == "cuda":
        if not store.pin:
            raise RuntimeError("engine='graph' reads the host store from the GPU, so it must be pinned; "
                               "offload with CUDA available")
        gather_misses = _kernel().gather_misses

        def gather(layer: int, misses: Misses) -> None:
            gather_misses(store.layer(layer), pool.data, misses.experts, misses.slots, misses.count)

        return gather

    def host_gather(layer: int, misses: Misses) -> None:
        count = int(misses.count)  # free on the CPU
        pool.data.index_copy_(0, misses.slots[:count], store.layer(layer)[misses.experts[:count]])

    return host_gather
