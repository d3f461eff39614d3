"""Recording routing traces from a live model, reading them back, replaying them."""
import json

import pytest
import torch

import specmd
from specmd.runtime.adapters import find_moe_layers
from specmd.study.sim import simulate
from specmd.study.trace import load_trace
from specmd.tiny import tiny_model


def record(model, device, prompts=((7, 5), (4, 3)), lookahead=2):
    recorder = model.specmd.record_routing(lookahead=lookahead, model="tiny-olmoe")
    for length, decode in prompts:
        ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
    model.specmd.stop_recording()
    return recorder


def test_recorded_trace_round_trips_and_documents_itself(tmp_path, device):
    model = specmd.offload(tiny_model("olmoe"), "100%", device=device)
    recorder = record(model, device)
    path = tmp_path / "trace.json"
    recorder.save(path)
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == ("specmd-routing-trace", 1)
    assert data["prompts"] == [{"tokens": 7, "decode": 5}, {"tokens": 4, "decode": 3}]
    assert len(data["passes"]) == 1 + 5 + 1 + 3
    first = data["passes"][0]["layers"][0]
    assert len(first["ids"]) == len(first["weights"]) == 7 * 2
    assert len(first["predicted"]) == len(first["scores"]) == 2  # lookahead 2
    assert all(len(row) == 4 for row in first["predicted"])  # 2 * top-k candidates
    assert all(a >= b for row in first["scores"] for a, b in zip(row, row[1:]))  # best first
    trace = load_trace(path)
    assert trace.prompts == ((7, 5), (4, 3)) and trace.predicted is not None
    # every access the live engine counted is in the trace
    stats = model.specmd.stats()
    assert sum(len(set(ids)) for p in trace.passes for ids in p) == stats.total.accesses
    model.specmd.close()


def test_recorded_routing_is_what_the_model_routes(device):
    # Record with the full budget; replaying the recording at a small budget through the live engine and
    # simulating it give the same counts, and the same as running the model without replay.
    model = tiny_model("olmoe").to(device)
    expert = find_moe_layers(model)[0].layout.expert_bytes
    specmd.offload(model, "100%", device=device)
    recorder = record(model, device)
    model.specmd.close()
    trace = load_trace_from(recorder)
    specmd.offload(model, 3 * expert, "lru", device)
    record(model, device)  # the model's own routing, no replay
    own = model.specmd.stats()
    model.specmd.close()
    sim = simulate(trace, 3, "lru")
    assert [(s.hits, s.misses_collision, s.evictions) for s in own.layers] == \
           [(s.hits, s.misses_collision, s.evictions) for s in sim.layers]


def load_trace_from(recorder):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.json"
        recorder.save(path)
        return load_trace(path)


def test_a_gzip_trace_reads_as_its_plain_json(tmp_path, device):
    # Large traces ship as .json.gz (benchmarks/traces); the reader knows them by their bytes, not name.
    model = specmd.offload(tiny_model("olmoe"), "100%", device=device)
    recorder = record(model, device)
    model.specmd.close()
    recorder.save(tmp_path / "t.json")
    recorder.save(tmp_path / "t.json.gz")
    assert (tmp_path / "t.json.gz").read_bytes()[:2] == b"\x1f\x8b"
    plain, packed = load_trace(tmp_path / "t.json"), load_trace(tmp_path / "t.json.gz")
    assert (packed.passes, packed.predicted, packed.prompts) == (plain.passes, plain.predicted, plain.prompts)
    (tmp_path / "cut.json.gz").write_bytes((tmp_path / "t.json.gz").read_bytes()[:40])
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(tmp_path / "cut.json.gz")


def test_unknown_trace_version(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "specmd-routing-trace", "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_trace(path)


def test_cli_records_and_simulates(tmp_path):
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\nhello world\n")
    out = tmp_path / "trace.json"
    run = subprocess.run([sys.executable, "-m", "specmd.cli", "trace", "tiny", "--prompts", str(prompts), "--out",
                          str(out), "--new-tokens", "4", "--device", "cpu"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    trace = load_trace(out)
    assert trace.prompts == ((9, 3), (11, 3))  # byte tokens; the empty line is skipped
    sim = subprocess.run([sys.executable, "-m", "specmd.cli", "sim", str(out), "--budget", "10%", "--eviction",
                          "lru,belady", "--out", str(tmp_path / "sim.json")], capture_output=True, text=True,
                         timeout=300)
    assert sim.returncode == 0, sim.stderr
    rows = json.loads((tmp_path / "sim.json").read_text())
    assert [r["eviction"] for r in rows] == ["lru", "belady"]
    assert rows[1]["hit_rate"] >= rows[0]["hit_rate"]
    bad = subprocess.run([sys.executable, "-m", "specmd.cli", "sim", str(prompts)], capture_output=True, text=True)
    assert bad.returncode == 2 and "specmd:" in bad.stderr


def test_a_trace_head_keeps_every_prompt_with_its_first_decode_passes():
    from specmd.study.trace import RoutingTrace

    passes = [[[p]] for p in range(7)]  # prompt A: prefill 0, decode 1-3; prompt B: prefill 4, decode 5-6
    trace = RoutingTrace(1, 8, 1, passes, "t.json", ((5, 3), (4, 2)), [[[[p + 1]]] for p in range(7)])
    head = trace.head(2)
    assert head.passes == [[[0]], [[1]], [[2]], [[4]], [[5]], [[6]]]
    assert head.prompts == ((5, 2), (4, 2)) and head.predicted[3] == [[[5]]]
    assert head.source == "t.json (first 2 decode steps per prompt)"
    with pytest.raises(ValueError, match="at least one decode pass"):
        trace.head(0)
