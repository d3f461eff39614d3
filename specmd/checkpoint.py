"""What a local checkpoint folder must hold, checked before anything is loaded: transformers' own messages
speak of hub repo ids (nothing is ever fetched here) or come after minutes of reading."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .runtime.adapters import SUPPORTED_FAMILIES


def check_checkpoint(path: Path) -> None:
    """Refuse a folder that is missing, is not a checkpoint, is not a supported MoE model, or whose weight
    files are missing or unreadable (headers only: cheap). Raises FileNotFoundError or ValueError."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder; specmd reads local checkpoints only (nothing "
                                "is downloaded): pass the folder that holds config.json and the weights")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a Mixture-of-Experts family specmd supports; "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{shard}: unreadable ({err}); it may be truncated or not a safetensors file: copy "
                             "the checkpoint again") from err


def shard_files(path: Path) -> list[Path]:
    """The safetensors files the checkpoint names (its index, or the single file); missing ones refused."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{path}: {len(missing)} of {len(names)} weight shards are missing ({missing[0]} ...); "
                             "copy the whole checkpoint")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{path}: no model.safetensors nor model.safetensors.index.json; specmd reads "
                         "safetensors checkpoints")
    return [single]
