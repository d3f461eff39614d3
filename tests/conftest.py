import os

import pytest

# The same tests run on the GPU machine with SPECMD_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SPECMD_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    return DEVICE
