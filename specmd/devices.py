"""Where an offloaded model runs: the device it is given, its free memory, and moving all but the experts."""
from __future__ import annotations

import torch
from torch import nn


def resolve_device(name: str | None) -> torch.device:
    """The device the model runs on; raises when CUDA is asked for and absent."""
    device = torch.device(name if name is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available to torch {torch.__version__}; "
                           "pass device='cpu' (or None to pick automatically), or install a CUDA build of torch")
    if device.type == "cuda" and device.index is None:
        # An explicit index: the watchdog thread must select the same device (set_device needs one).
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, read through NVML."""
    if device.type != "cuda":
        raise ValueError("expert_budget='auto' needs a CUDA device; pass a size such as '600MB' or a fraction")
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return int(info.free), int(info.total)
    finally:
        pynvml.nvmlShutdown()


def host_memory_available() -> int | None:
    """Bytes of host memory the kernel says can be allocated without swapping (Linux's MemAvailable), or None
    where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def move_except_experts(model: nn.Module, experts: list[nn.Module], device: torch.device) -> None:
    """``model.to(device)`` for everything but the ``experts`` modules, whose parameters stay in the host store."""
    # model.to() would also drag the host-store views to the device; hide them from it for the move.
    hidden = [(m, dict(m._parameters)) for m in experts]
    for module, _ in hidden:
        module._parameters.clear()
    try:
        model.to(device)
    finally:
        for module, params in hidden:
            module._parameters.update(params)
