"""The YAML that ships with specmd: policy presets, hardware profiles, model shapes and bench matrices.

They live once, in the repository's ``configs/`` folder; an installed wheel carries that folder as the
package ``specmd.configs`` (``pyproject.toml`` maps it), so presets work outside a checkout too.
"""
from __future__ import annotations

from pathlib import Path

KINDS = {"policies": "policy preset", "hardware": "hardware profile", "models": "model file", "bench": "bench config"}


def configs_dir() -> Path:
    """The folder holding ``policies/``, ``hardware/``, ``models/`` and ``bench/``."""
    try:
        import specmd.configs as shipped  # the installed package data (a wheel, or an editable install)
    except ModuleNotFoundError:  # a checkout on the path without an install (PYTHONPATH=.)
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(shipped.__file__).parent


def names(kind: str) -> list[str]:
    """The shipped names of ``kind`` (a key of ``KINDS``), sorted."""
    return sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml"))


def find(kind: str, name: str | Path) -> Path:
    """A YAML path as given, or a shipped name of ``kind``; the error lists the shipped names."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    candidate = configs_dir() / kind / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise ValueError(f"no {KINDS[kind]} {str(name)!r}; pass a YAML path or one of: {', '.join(names(kind))}")
