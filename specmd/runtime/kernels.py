"""The project's Triton kernels (``kernels/`` in the repository, ``specmd.kernels`` once installed), imported
on first use: only CUDA paths need them, and a CPU install may have no triton."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


@functools.cache
def kernel(name: str) -> ModuleType:
    """The module ``specmd.kernels.<name>``."""
    if importlib.util.find_spec("specmd.kernels") is None:
        # A checkout on the path without an install: kernels/ sits beside the package. Registered under its
        # installed name, since torch.compile re-imports a kernel's module by name when it traces the launch.
        root = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location("specmd.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["specmd.kernels"] = package
        spec.loader.exec_module(package)
    try:
        return importlib.import_module(f"specmd.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name == "triton":
            raise RuntimeError("engine='graph' on CUDA runs Triton kernels and this Python has no triton; install "
                               "it (pip install triton) or use engine='threaded'") from err
        raise
