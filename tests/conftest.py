import os

# Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with another job torch's
# threads oversubscribe the cores (a 4-minute suite took 39). One thread here and in every subprocess; the
# watchdog is a Python thread and is unaffected.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The same tests run on the GPU machine with SPECMD_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SPECMD_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def compiled_generate(device) -> dict:
    """generate's keyword arguments for a compiled decode step on the tests' device: a static cache, and on
    the CPU torch.compile's eager backend (dynamo's tracing without inductor; transformers compiles only on
    accelerators unless told); on CUDA transformers' default (inductor, CUDA graphs)."""
    kwargs = dict(cache_implementation="static", disable_compile=False)
    if device == "cpu":
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig(backend="eager")
        kwargs["compile_config"]._compile_all_devices = True
    return kwargs
