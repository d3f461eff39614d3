"""The command line as a new user meets it: every advertised budget form works in `run` and `sim`, and every
bad input exits non-zero with one line on stderr that names the problem and the fix, never a traceback."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specmd.tiny
from specmd.cli import main
from specmd.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, argv
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    """A routing trace of the tiny model with predictions 3 layers ahead (through `specmd trace`)."""
    folder = tmp_path_factory.mktemp("trace")
    (folder / "prompts.txt").write_text("def f(x):\nimport os\n")
    out = folder / "tiny.json"
    assert main(["trace", "tiny", "--prompts", str(folder / "prompts.txt"), "--out", str(out),
                 "--new-tokens", "3", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated")
    tiny_model("olmoe").save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return folder


@pytest.mark.parametrize("budget", ["0.05", "0.5", "5%", "600MB", "3 experts", "1000000"])
def test_run_takes_every_advertised_budget_form(budget, capsys):
    assert main(["run", "--model", "tiny", "--budget", budget, "--new-tokens", "2", "--device", "cpu"]) == 0
    assert "slots: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--budget", "-5%"], ["-5%", "positive"]),
    (["--budget", "abc"], ["'abc'", "'5%'"]),
    (["--budget", "1.5"], ["fraction", "600MB"]),
    (["--budget", "12 apples"], ["apples", "unit"]),
    (["--budget", "auto", "--device", "cpu"], ["auto", "CPU", "25%"]),
    (["--dtype", "float99"], ["float99", "bfloat16"]),
    (["--eviction", "mru"], ["mru", "least-stale"]),
    (["--preset", "no-such"], ["no-such", "lru-topk"]),
    (["--lookahead", "-1", "--prefetch", "topk"], ["lookahead", "1, 2 or 3"]),
])
def test_run_refuses_bad_settings_before_loading_anything(argv, words, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(specmd.tiny, "tiny_model", no_model)
    one_line_error(capsys, ["run", "--model", "tiny", "--device", "cpu", *argv], *words)


def test_run_with_the_graph_engine_preset_and_flag(capsys):
    assert main(["run", "--model", "tiny", "--preset", "least-stale-graph", "--new-tokens", "3", "--device", "cpu"]) == 0
    assert "engine: graph  eviction: least-stale" in capsys.readouterr().out
    assert main(["run", "--model", "tiny", "--engine", "graph", "--eviction", "lfu", "--new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert "engine: graph  eviction: lfu" in capsys.readouterr().out
    assert main(["run", "--model", "tiny", "--engine", "graph", "--prefetch", "topk", "--new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert "engine: graph  eviction: least-stale  prefetch: topk" in capsys.readouterr().out


def test_run_refuses_bad_checkpoints(tmp_path, truncated_checkpoint, capsys):
    one_line_error(capsys, ["run", "--model", str(tmp_path / "nowhere"), "--device", "cpu"],
                   "no such checkpoint folder", "nothing is downloaded")
    one_line_error(capsys, ["run", "--model", str(tmp_path), "--device", "cpu"], "no config.json")
    one_line_error(capsys, ["run", "--model", str(truncated_checkpoint), "--device", "cpu"], "truncated")


def test_run_refuses_what_is_not_a_supported_moe_checkpoint(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    capsys.readouterr()  # save_pretrained's progress bar
    one_line_error(capsys, ["run", "--model", str(dense), "--device", "cpu"], "'llama'", "olmoe")
    sharded = tmp_path / "sharded"
    tiny_model("olmoe").save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    capsys.readouterr()
    one_line_error(capsys, ["run", "--model", str(sharded), "--device", "cpu"], "missing", "copy the whole")


def test_trace_names_its_model(trace_file):
    data = json.loads(trace_file.read_text())
    assert data["model"] == "tiny" and data["lookahead"] == 3


@pytest.mark.parametrize("budget, capacity", [("0.05", 6), ("25%", 32), ("3", 3), ("3 experts", 3),
                                              ("600MB", 47), ("0.005", 0)])
def test_sim_takes_the_same_budget_forms(budget, capacity, trace_file, capsys, tmp_path):
    timing = ["--hardware", "pcie-gen4-x16", "--model-timing", "olmoe-1b-7b-0924"] if "MB" in budget else []
    argv = ["sim", str(trace_file), "--budget", budget, "--eviction", "lru", "--out", str(tmp_path / "s.json"),
            *timing]
    if capacity == 0:  # 0.5% of 128 experts rounds down to none: said, not simulated
        one_line_error(capsys, argv, "0.005", "at least 1")
        return
    assert main(argv) == 0
    assert json.loads((tmp_path / "s.json").read_text())[0]["capacity"] == capacity


@pytest.mark.parametrize("argv, words", [
    (["--prefetch", "topk", "--lookahead", "4"], ["lookahead=4", "1, 2 or 3"]),
    (["--prefetch", "topk", "--lookahead", "0"], ["lookahead=0"]),
    (["--budget", "abc"], ["'abc'", "experts"]),
    (["--budget", "600MB"], ["--model-timing"]),
    (["--budget", "auto"], ["auto"]),
    (["--eviction", "mru"], ["mru", "belady"]),
    (["--warm", "--eviction", "lru,belady"], ["belady without warm"]),
    (["--engine", "graph", "--eviction", "belady"], ["belady", "layer-distance"]),
    (["--engine", "graph", "--hardware", "pcie-gen4-x16", "--model-timing", "olmoe-1b-7b-0924"],
     ["graph link profile", "h200-graph-measured"]),
    (["--engine", "graph", "--prefetch", "topk", "--k", "9"], ["candidates", "k and lookahead"]),
])
def test_sim_refuses_bad_input_in_one_line(argv, words, trace_file, capsys):
    one_line_error(capsys, ["sim", str(trace_file), *argv], *words)


def test_sim_runs_the_graph_engines_schedule(trace_file, tmp_path):
    """`sim --engine graph` counts what simulate_graph counts (the graph engine's schedule, warm-up included)
    and prices it with a graph link profile."""
    from specmd.study.graph_sim import simulate_graph
    from specmd.study.trace import load_trace

    out = tmp_path / "g.json"
    assert main(["sim", str(trace_file), "--engine", "graph", "--budget", "6", "--eviction", "lru,layer-distance",
                 "--prefetch", "topk", "--k", "2", "--warm", "--hardware", "h200-graph-measured",
                 "--model-timing", "olmoe-1b-7b-0924", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["engine"], r["eviction"]) for r in rows] == [("graph", "lru"), ("graph", "layer-distance")]
    for row in rows:
        want = simulate_graph(load_trace(trace_file), 6, row["eviction"], "topk", 1, 2, warm=True)
        assert row["total"]["hits"] == want.total.hits and row["total"]["prefetches"] == want.total.prefetches
        assert row["total"]["misses_cold"] == 0 and row["estimated_tpot_ms"] > 0


def test_sim_refuses_a_file_that_is_not_a_trace(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# not json\n")
    one_line_error(capsys, ["sim", str(readme)], "README.md", "not a routing trace")
    one_line_error(capsys, ["sim", str(tmp_path / "missing.json")], "missing.json")


def test_sim_plots_percent_budgets_on_one_axis(trace_file, tmp_path, monkeypatch):
    from specmd.bench import report

    seen = []
    monkeypatch.setattr(report, "hit_rate_plot", lambda rows, path, title="": seen.extend(
        report.budget_percent(r) for r in rows))
    assert main(["sim", str(trace_file), "--budget", "32,25%", "--eviction", "lru", "--plot",
                 str(tmp_path / "p.png")]) == 0
    assert seen == [25.0, 25.0]  # 32 of 128 experts and 25% are the same point


def test_bench_errors_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["bench", str(tmp_path / "missing.yaml")], "missing.yaml")
    if not torch.cuda.is_available():
        one_line_error(capsys, ["bench", str(ROOT / "configs" / "bench" / "smoke.yaml")], "CUDA")


@pytest.mark.parametrize("argv, words", [
    (["trace", "tiny", "--prompts", "p.txt", "--out", "t.json", "--lookahead", "4"], ["--lookahead 4", "1, 2 or 3"]),
    (["trace", "tiny", "--prompts", "p.txt", "--out", "t.json", "--lookahead", "0"], ["--lookahead 0"]),
    (["run", "--model", "tiny", "--new-tokens", "0"], ["--new-tokens 0", "at least 1"]),
    (["run", "--lookahead", "two"], ["--lookahead", "'two'", "--help"]),
    (["run", "--budget", "--eviction", "lru"], ["--budget", "--help"]),
])
def test_argument_errors_are_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(specmd.tiny, "tiny_model", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit) if "--help" in words else contextlib.nullcontext():
        code = main(argv)
        assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err


def test_python_dash_m_specmd_version():
    out = subprocess.run([sys.executable, "-m", "specmd", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"specmd {specmd.__version__}"
