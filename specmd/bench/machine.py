"""What a benchmark ran on: GPU (through pynvml where installed, else torch), host, library versions and
the specmd commit. Recorded in every result file, so a figure never travels without its machine."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_LIBRARIES = ("torch", "transformers", "accelerate", "safetensors")


def specmd_commit() -> str:
    """``SPECMD_COMMIT`` if set (a copied working tree has no .git), else ``git rev-parse HEAD``, else
    "unknown"."""
    if commit := os.environ.get("SPECMD_COMMIT"):
        return commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host_memory_bytes() -> int:
    """Physical memory of this host (POSIX)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _nvml(index: int) -> dict:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "pynvml not installed"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "pcie_generation": pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
            "pcie_generation_max": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
            "pcie_width": pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
            "pcie_width_max": pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle),
            "memory_bytes_nvml": pynvml.nvmlDeviceGetMemoryInfo(handle).total,
        }
    except pynvml.NVMLError as err:
        return {"nvml": f"error: {err}"}


def machine_info(device: torch.device | None = None) -> dict:
    """GPU name, memory, driver, PCIe generation and width, host cores and memory, library versions and
    the specmd commit."""
    info = {"host_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "specmd_commit": specmd_commit()}
    try:
        info["host_memory_bytes"] = host_memory_bytes()
    except (ValueError, OSError):
        pass
    for name in _LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    info["torch_cuda"] = torch.version.cuda
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    compute_capability=f"{props.major}.{props.minor}", **_nvml(index))
    return info
