"""specmd: lossless expert offloading for Hugging Face Mixture-of-Experts models under a fixed VRAM budget."""
from .api import from_config, from_pretrained, offload
from .config import Budget, OffloadConfig
from .handle import OffloadHandle
from .runtime.adapters import SUPPORTED_FAMILIES, UnsupportedModelError
from .runtime.engines.binding import ClosedHandleError
from .runtime.metrics import LayerStats, Stats
from .runtime.policies import POLICIES
from .shipped import shipped_model_path

__all__ = [
    "offload", "from_pretrained", "from_config", "OffloadHandle", "OffloadConfig", "Budget", "Stats", "LayerStats",
    "POLICIES", "SUPPORTED_FAMILIES", "UnsupportedModelError", "ClosedHandleError", "shipped_model_path",
]
__version__ = "0.1.0"
