"""specmd: lossless expert offloading for Hugging Face Mixture-of-Experts models under a fixed VRAM budget."""
from .adapters import SUPPORTED_FAMILIES, UnsupportedModelError
from .api import OffloadHandle, from_config, from_pretrained, offload
from .config import Budget, OffloadConfig
from .engine import ClosedHandleError
from .metrics import LayerStats, Stats
from .policies import POLICIES

__all__ = [
    "offload", "from_pretrained", "from_config", "OffloadHandle", "OffloadConfig", "Budget", "Stats", "LayerStats",
    "POLICIES", "SUPPORTED_FAMILIES", "UnsupportedModelError", "ClosedHandleError",
]
__version__ = "0.1.0"
