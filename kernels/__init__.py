"""specmd's GPU kernels, installed as the package ``specmd.kernels`` (``pyproject.toml`` maps this folder)."""
