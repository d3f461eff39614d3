import os

import pytest
import torch

# The same tests run on the GPU machine with SPECMD_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SPECMD_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


@pytest.fixture
def device() -> str:
    return DEVICE
