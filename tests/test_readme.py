"""The README's snippets run as pasted, on a CPU: its ```python blocks, and its ```sh blocks (specmd commands,
from the repository root, inside the environment the Makefile makes), each block as one script."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
SNIPPETS = [(lang, code) for lang, code in BLOCKS if lang in ("python", "sh")]


def test_the_readme_has_snippets():
    assert {lang for lang, _ in SNIPPETS} == {"python", "sh"}


@pytest.mark.parametrize("lang, code", SNIPPETS, ids=lambda v: v.splitlines()[0][:40] if "\n" in v else v)
def test_snippet_runs_as_pasted(lang, code, tmp_path):
    # A folder that looks like the repository root (its relative paths resolve) and keeps what they write.
    for name in ("specmd", "benchmarks", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}  # as on a CPU-only machine
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
