"""The built wheel: it carries the presets, hardware profiles and model shapes, and runs from outside the
checkout with nothing but itself on the path."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import specmd, sys
from specmd.study.costmodel import LinkProfile, ModelSpec
assert specmd.__file__.startswith(sys.argv[1]), specmd.__file__
print(LinkProfile.load("pcie-gen4-x16").link_gbps, ModelSpec.load("qwen3-30b-a3b").family)
"""


def test_the_wheel_carries_its_yaml_and_runs_a_preset_outside_the_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("specmd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("policies", "hardware", "models", "bench"):
        shipped = {p.name for p in (ROOT / "configs" / kind).glob("*.yaml")}
        assert shipped and {f"specmd/configs/{kind}/{n}" for n in shipped} <= names, kind
    assert "specmd/py.typed" in names and "specmd/checkpoints/olmoe-pystdlib/config.json" in names
    assert "specmd/kernels/miss_gather.py" in names
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    check = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=outside, env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["26.0", "qwen3_moe"]
    run = subprocess.run([sys.executable, "-m", "specmd.cli", "run", "--preset", "least-stale-topk", "--model",
                          "tiny", "--new-tokens", "4", "--device", "cpu"], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "eviction: least-stale  prefetch: topk" in run.stdout
    shipped = subprocess.run([sys.executable, "-m", "specmd", "run", "--new-tokens", "2", "--device", "cpu"],
                             cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert shipped.returncode == 0, shipped.stderr  # the checkpoint that ships inside the wheel
