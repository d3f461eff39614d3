"""The MoE checkpoint that ships inside the package: trained here on the Python standard library's
source (benchmarks/train_tiny_moe.py; its training_report.json sits beside the weights)."""
from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "checkpoints" / "olmoe-pystdlib"


def shipped_model_path() -> Path:
    """The shipped checkpoint's directory; raises if this install lacks it."""
    if not (SHIPPED_MODEL / "config.json").exists():
        raise FileNotFoundError(f"no shipped checkpoint at {SHIPPED_MODEL}; reinstall specmd with its package data")
    return SHIPPED_MODEL
