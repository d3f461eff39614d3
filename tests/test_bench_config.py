import subprocess
import sys

import pytest
import torch

from specmd.bench import BenchConfig

DEFAULT = "configs/bench/default.yaml"


def test_default_matrix_is_valid():
    config = BenchConfig.load(DEFAULT)
    assert config.models == ("olmoe-1b-7b-0924",) and config.budgets == ("5%", "10%", "20%")
    assert config.num_runs == 1 * 3 * 2 * 2 * 1 * 4


@pytest.mark.parametrize("text, match", [
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nbugdets: ['5%']\n", "'bugdets'"),
    ("budgets: ['5%']\nprompts: [16]\n", "missing key 'models'"),
    ("models: [olmoe-9000]\nbudgets: ['5%']\nprompts: [16]\n", "models: .*mixtral-8x7b"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: [lots]\nprompts: [16]\n", "budgets"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nlinks: [pcie-gen7]\n", "links: .*native"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [0]\n", "'prompts'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nrepeats: many\n", "'repeats'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nbaselines: [vllm]\n", "baselines: unknown 'vllm'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\npresets: [lru-psychic]\n", "presets"),
    ("- just a list\n", "mapping"),
])
def test_malformed_config_names_the_bad_key(tmp_path, text, match):
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        BenchConfig.load(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_without_a_gpu_exits_with_one_line():
    run = subprocess.run([sys.executable, "-m", "specmd.cli", "bench", DEFAULT], capture_output=True, text=True)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]


def test_bench_with_a_bad_config_exits_naming_the_key(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nwarmup: 3\n")
    run = subprocess.run([sys.executable, "-m", "specmd.cli", "bench", str(path)], capture_output=True, text=True)
    assert run.returncode == 2 and "'warmup'" in run.stderr
