import subprocess
import sys

import pytest
import torch

from specmd.bench.config import BenchConfig

DEFAULT = "configs/bench/default.yaml"


def test_default_matrix_is_valid():
    config = BenchConfig.load(DEFAULT)
    assert config.models == ("olmoe-1b-7b-0924",) and config.budgets == ("5%", "10%", "20%")
    assert config.num_runs == 1 * 3 * 2 * 2 * 1 * 2
    assert BenchConfig.load("configs/bench/prefetch.yaml").num_runs == 2 * 2 * 8
    # the specmd rows replay learned routing; every large model its own topology's trace
    assert config.trace_path("olmoe-1b-7b-0924") == "benchmarks/traces/trace-olmoe-1b-7b-0924-stdlib.json.gz"
    large = BenchConfig.load("configs/bench/large-models.yaml")
    assert all(large.trace_path(model) for model in large.models)
    assert BenchConfig.load("configs/bench/smoke.yaml").trace_path("olmoe-1b-7b-0924") is None
    assert BenchConfig.load("configs/bench/graph.yaml").num_runs == 5 * 3


@pytest.mark.parametrize("text, match", [
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nbugdets: ['5%']\n", "'bugdets'"),
    ("budgets: ['5%']\nprompts: [16]\n", "missing key 'models'"),
    ("models: [olmoe-9000]\nbudgets: ['5%']\nprompts: [16]\n", "models: .*mixtral-8x7b"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: [lots]\nprompts: [16]\n", "budgets"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: [auto]\nprompts: [16]\n", "budgets: 'auto' depends on the free"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nlinks: [pcie-gen7]\n", "links: .*native"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [0]\n", "'prompts'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nrepeats: many\n", "'repeats'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nbaselines: [vllm]\n", "baselines: unknown 'vllm'"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\npresets: [lru-psychic]\n", "presets"),
    ("models: [olmoe-1b-7b-0924]\nbudgets: ['5%']\nprompts: [16]\nplace: gpu\n", "'place' must be one of device, host"),
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


def test_a_part_of_the_matrix_overrides_budgets_baselines_and_presets():
    """`specmd bench CONFIG --budgets 10% --baselines none --presets lru-topk`: one part of a matrix too long for one device call;
    what the part names is validated as the config's own keys are."""
    config = BenchConfig.load("configs/bench/default.yaml")
    part = config.overridden("default.yaml", budgets="10%, 20%", baselines="full-gpu-grouped-mm")
    assert part.budgets == ("10%", "20%") and part.baselines == ("full-gpu-grouped-mm",)
    assert part.presets == config.presets and part.routing == config.routing
    assert config.overridden("default.yaml", baselines="none").baselines == ()
    with pytest.raises(ValueError, match="budgets"):
        config.overridden("default.yaml", budgets="lots")
    with pytest.raises(ValueError, match="unknown 'fastest'"):
        config.overridden("default.yaml", baselines="fastest")
    with pytest.raises(ValueError, match="at least one budget"):
        config.overridden("default.yaml", budgets=" , ")
    assert config.overridden("default.yaml", presets="lru-topk, lru-noprefetch").presets == \
        ("lru-topk", "lru-noprefetch")
    with pytest.raises(ValueError, match="no-such-preset"):
        config.overridden("default.yaml", presets="no-such-preset")
    with pytest.raises(ValueError, match="at least one preset"):
        config.overridden("default.yaml", presets=",")
    baselines_only = config.overridden("default.yaml", presets="none", baselines="on-demand")
    assert baselines_only.presets == () and baselines_only.num_runs == 0
    with pytest.raises(ValueError, match="nothing to run"):
        config.overridden("default.yaml", presets="none", baselines="none")


def test_a_part_of_the_matrix_narrows_the_models_and_their_routing():
    """`--models qwen3-30b-a3b`: one model of large-models.yaml, still on its own trace; a model the config does
    not have is refused, naming those it has."""
    config = BenchConfig.load("configs/bench/large-models.yaml")
    part = config.overridden("large-models.yaml", models="qwen3-30b-a3b")
    assert part.models == ("qwen3-30b-a3b",)
    assert part.routing == {"qwen3-30b-a3b": config.routing["qwen3-30b-a3b"]}
    assert part.trace_path("qwen3-30b-a3b") == config.trace_path("qwen3-30b-a3b")
    assert part.budgets == config.budgets and part.presets == config.presets
    with pytest.raises(ValueError, match="'mixtral' is not one of the config's models .*qwen3-30b-a3b"):
        config.overridden("large-models.yaml", models="mixtral")
    with pytest.raises(ValueError, match="at least one of"):
        config.overridden("large-models.yaml", models=" ,")
    with pytest.raises(ValueError, match="'qwen3-30b-a3b' is named twice"):
        config.overridden("large-models.yaml", models="qwen3-30b-a3b,qwen3-30b-a3b")
    # Mixtral replays a shorter trace (22.5 GB copied a step at 5%); the others replay theirs whole
    assert config.replay_decode_of("mixtral-8x7b") == 32 and part.replay_decode is None
    assert config.overridden("large-models.yaml", models="mixtral-8x7b").replay_decode == {"mixtral-8x7b": 32}


TINY_SPEC = """family: olmoe
config: {vocab_size: 256, hidden_size: 64, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 4,
         num_key_value_heads: 2, num_experts: 8, num_experts_per_tok: 2, max_position_embeddings: 128,
         bos_token_id: 1, eos_token_id: 2, pad_token_id: 0}
"""


def test_graph_rows_check_tokens_in_their_own_mode(tmp_path):
    """A graph-engine row's tokens are checked like with like: on a CPU its steps run uncompiled, so against the
    uncompiled full-GPU model, and the row says so; the compiled full-GPU baseline needs CUDA and says so."""
    from specmd.bench.runner import run

    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['50%']\nprompts: [5]\nnew_tokens: 3\nrepeats: 1\n"
                    "presets: [lru-graph, lru-noprefetch]\nbaselines: [full-gpu-grouped-mm, full-gpu-compiled]\n")
    results = run(BenchConfig.load(path), torch.device("cpu"), progress=False, log=lambda _: None)
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"full-gpu-grouped-mm", "lru-graph", "lru-noprefetch"}
    assert rows["lru-graph"]["identical_tokens"] and rows["lru-graph"]["token_check"] == "uncompiled"
    assert rows["lru-noprefetch"]["identical_tokens"]
    assert results["skipped"] == [f"{spec.stem}: full-gpu-compiled skipped: transformers compiles the decode step "
                                  "(CUDA graphs) on CUDA only"]


def test_runner_end_to_end_on_cpu_writes_json_table_and_plots(tmp_path):
    """The runner's plumbing on a tiny model (CPU timings are never reported: the CLI refuses without CUDA)."""
    import json
    import math

    from specmd.bench.report import summary_table, write_results
    from specmd.bench.runner import run

    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%', '50%']\nprompts: [5]\nnew_tokens: 3\nrepeats: 1\n"
                    "batch: [1, 2]\npresets: [lru-noprefetch, least-stale-topk]\n"
                    "baselines: [full-gpu, full-gpu-grouped-mm, on-demand, device-map-auto]\n")
    config = BenchConfig.load(path)
    written = []
    results = run(config, torch.device("cpu"), progress=False, log=lambda _: None,
                  on_row=lambda r: written.append(len(r["rows"])))
    rows = results["rows"]
    names = [r["name"] for r in rows]
    assert names.count("full-gpu") == names.count("full-gpu-grouped-mm") == 2  # one per batch size
    assert names.count("lru-noprefetch") == names.count("least-stale-topk") == 4  # 2 budgets x 2 batches
    assert names.count("on-demand") == 2
    assert written == list(range(1, len(rows) + 1))  # files can be written after every row
    assert all(r["identical_tokens"] for r in rows)
    assert all(math.isfinite(r["tpot_ms"]) and math.isfinite(r["ttft_ms"]) for r in rows)  # values: GPU only
    on_demand = [r for r in rows if r["name"] == "on-demand"]
    assert all(r["num_slots"] == 2 and r["hit_rate"] == 0.0 for r in on_demand)  # top-k slots, nothing reused
    assert results["skipped"] == [f"{spec.stem}: device-map-auto needs CUDA"]
    assert results["machine"]["host_cores"] >= 1 and results["machine"]["torch"]
    files = write_results(results, tmp_path, "bench")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["name"] == "full-gpu-grouped-mm"
    table = (tmp_path / "bench.md").read_text()
    assert "| lru-noprefetch @ 25% |" in table and "| yes |" in table
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 3 and all(f.stat().st_size > 1000 for f in pngs)
    assert "least-stale-topk @ 50%" in summary_table(results)


def test_runner_builds_into_the_host_store_when_told(tmp_path):
    """place: host (what a model larger than the GPU gets): no full-GPU baselines, each skip said, and every
    configuration checked against the first specmd configuration's tokens."""
    from specmd.bench.runner import run

    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%', '50%']\nprompts: [5]\nnew_tokens: 3\nrepeats: 1\n"
                    "presets: [lru-noprefetch, least-stale-topk]\nplace: host\n")
    results = run(BenchConfig.load(path), torch.device("cpu"), progress=False, log=lambda _: None)
    rows = results["rows"]
    assert [r["name"] for r in rows] == ["lru-noprefetch", "least-stale-topk"] * 2 + ["on-demand"]
    assert rows[0]["identical_tokens"] is None and all(r["identical_tokens"] for r in rows[1:])
    assert results["placement"] == {spec.stem: "host"}
    assert results["reference"] == {spec.stem: "the first specmd configuration of each mode"}
    assert len(results["skipped"]) == 3 and all("does not fit the device whole" in s for s in results["skipped"])


def _recorded_trace(spec_path, path):
    """A trace of the bench's tiny model's own routing (its predictor's candidates 2 layers ahead), two
    prompts, saved where a bench config can name it."""
    from specmd.bench.models import build_model
    from specmd.study.costmodel import ModelSpec

    model, _ = build_model(ModelSpec.load(spec_path), torch.device("cpu"))
    import specmd

    specmd.offload(model, "100%", "lru", "cpu")
    recorder = model.specmd.record_routing(lookahead=2)
    for length, decode in ((6, 4), (4, 3)):
        ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(length))
        model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, do_sample=False)
    model.specmd.close()
    recorder.save(path)
    return path


def test_runner_replays_a_trace_where_the_config_says_so(tmp_path):
    """routing: {model: replay PATH}: every specmd row runs on the trace's routing (its prompts, the counts of
    the whole replay) and says so; its tokens are still checked under the model's own routers against the
    full-GPU reference; a preset the trace cannot serve (top-p, whose candidates the trace ranks without
    scores) is skipped with the reason; the full-GPU rows say they ran on the model's routers."""
    from specmd.bench.report import bench_markdown
    from specmd.bench.runner import run

    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    trace = _recorded_trace(spec, tmp_path / "tiny-trace.json.gz")
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%']\nprompts: [5]\nnew_tokens: 3\nrepeats: 1\n"
                    "presets: [lru-noprefetch, least-stale-topk, lru-top-p, lru-graph-topk]\n"
                    "baselines: [full-gpu-grouped-mm]\n"
                    f"routing: {{{spec}: replay {trace}}}\n")
    results = run(BenchConfig.load(path), torch.device("cpu"), progress=False, log=lambda _: None)
    rows = results["rows"]
    assert [(r["name"], r["routing"]) for r in rows] == [
        ("full-gpu-grouped-mm", "random"), ("lru-noprefetch", "replay tiny-trace.json.gz"),
        ("least-stale-topk", "replay tiny-trace.json.gz"), ("lru-graph-topk", "replay tiny-trace.json.gz")]
    assert all(r["identical_tokens"] for r in rows)
    replayed = rows[1]
    assert (replayed["prompt"], replayed["batch"], replayed["new_tokens"]) == (5, 1, 4)  # the trace's means
    passes = 2 + 4 + 3  # both prompts' prefills and decode steps: the whole replay's counts
    assert replayed["stats"]["forward_passes"] == passes
    assert rows[2]["stats"]["total"]["prefetches"] > 0  # the trace's candidates
    # the graph engine replays the same passes (on the CPU the bench model's grouped kernels take its chunked
    # path, which prefetches nothing: tests/test_graph_engine.py covers its prefetch under replay)
    assert rows[3]["stats"]["forward_passes"] == passes
    assert len(results["skipped"]) == 1 and "lru-top-p" in results["skipped"][0] and "top-p" in results["skipped"][0]
    assert results["routing"] == {spec.stem: "replay tiny-trace.json.gz"}
    table = bench_markdown(results)
    assert "replay tiny-trace.json.gz" in table and "| random |" in table
    from specmd.bench.report import bench_pivot_markdown
    assert "| native p5 (replayed: mean prompt) |" in bench_pivot_markdown(results)


def test_parts_of_a_matrix_merge_into_one_result():
    """A matrix split by budget into processes (one device call each) reads as one result: every specmd and
    per-budget baseline row once, the full-GPU baseline every part measured once (the first part's), the
    config's budgets joined, and each part's own run kept."""
    from specmd.bench.results import merge_results

    def part(budget, started):
        full = {"model": "m", "kind": "baseline", "name": "full-gpu-grouped-mm", "prompt": 16, "batch": 1,
                "budget": None, "tpot_ms": started}
        rows = [full] + [{"model": "m", "kind": kind, "name": name, "prompt": 16, "batch": 1, "budget": budget}
                         for kind, name in (("specmd", "lru-noprefetch"), ("baseline", "device-map-auto"))]
        config = {"budgets": [budget], "baselines": ["full-gpu-grouped-mm", "device-map-auto"],
                  "presets": ["lru-noprefetch"], "links": ["native"]}
        return {"machine": {}, "config": config, "rows": rows, "skipped": [f"skip {budget}"], "started": started,
                "native_gbps": {"m": started}}

    merged = merge_results([part("5%", 1), part("10%", 2)])
    assert [(r["name"], r["budget"]) for r in merged["rows"]] == [
        ("full-gpu-grouped-mm", None), ("lru-noprefetch", "5%"), ("device-map-auto", "5%"),
        ("lru-noprefetch", "10%"), ("device-map-auto", "10%")]
    assert merged["rows"][0]["tpot_ms"] == 1
    assert merged["config"]["budgets"] == ["5%", "10%"] and merged["skipped"] == ["skip 5%", "skip 10%"]
    assert [p["budgets"] for p in merged["parts"]] == [["5%"], ["10%"]]
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])


def test_parts_running_different_models_merge_with_each_models_entries():
    """large-models.yaml run a model per device call (`--models`): the merged result lists every model, its
    routing, placement and copy rate, and each model's full-GPU baseline once."""
    from specmd.bench.results import merge_results

    def part(model, gbps):
        rows = [{"model": model, "kind": "baseline", "name": "full-gpu-grouped-mm", "prompt": 16, "batch": 1,
                 "budget": None},
                {"model": model, "kind": "specmd", "name": "lru-noprefetch", "prompt": 320, "batch": 1, "budget": "5%"}]
        config = {"models": [model], "budgets": ["5%"], "baselines": ["full-gpu-grouped-mm"],
                  "presets": ["lru-noprefetch"], "links": ["native"], "routing": {model: f"replay {model}.json"}}
        return {"machine": {}, "config": config, "rows": rows, "skipped": [], "native_gbps": {model: gbps},
                "placement": {model: "device"}, "routing": {model: f"replay {model}.json"}}

    merged = merge_results([part("a", 50.0), part("b", 53.0), part("a", 51.0)])
    assert merged["config"]["models"] == ["a", "b"]
    assert merged["config"]["routing"] == {"a": "replay a.json", "b": "replay b.json"}
    on_own_routers = part("c", 49.0)
    on_own_routers["config"]["routing"] = "random"  # one setting for the part's every model, not a mapping
    assert merge_results([on_own_routers, part("a", 50.0)])["config"]["routing"] == {"c": "random",
                                                                                     "a": "replay a.json"}
    assert merged["native_gbps"] == {"a": 50.0, "b": 53.0}  # a model's first part, as its baseline
    assert merged["placement"] == {"a": "device", "b": "device"}
    assert [(r["model"], r["name"]) for r in merged["rows"]] == [
        ("a", "full-gpu-grouped-mm"), ("a", "lru-noprefetch"), ("b", "full-gpu-grouped-mm"), ("b", "lru-noprefetch"),
        ("a", "lru-noprefetch")]


@pytest.mark.parametrize("routing,match", [
    ("fast", "'random' or a mapping"),
    ("{elsewhere: random}", "not one of the models"),
    ("{MODEL: replay}", "write 'random' or 'replay PATH'"),
    ("{MODEL: replay /nowhere/trace.json}", "cannot read the trace"),
    ("{MODEL: replay benchmarks/traces/trace-olmoe16x64-stdlib.json}", "16 MoE layers x 64 experts, top-8; the "
                                                                        "model has 2 x 8, top-2"),
])
def test_bad_routing_names_the_fix(tmp_path, routing, match):
    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%']\nprompts: [5]\nrouting: {routing.replace('MODEL', str(spec))}\n")
    with pytest.raises(ValueError, match=match):
        BenchConfig.load(path)


@pytest.mark.parametrize("cap,match", [
    ("0", "replay_decode of .*: 0; give a positive number"),
    ("{elsewhere: 8}", "replay_decode: 'elsewhere' is not one of the models"),
    ("8\nrouting: random", "no model replays a trace"),
])
def test_bad_replay_decode_names_the_fix(tmp_path, cap, match):
    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    trace = _recorded_trace(spec, tmp_path / "tiny-trace.json.gz")
    routing = f"routing: {{{spec}: replay {trace}}}\n" if "routing" not in cap else ""
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%']\nprompts: [5]\n{routing}replay_decode: {cap}\n")
    with pytest.raises(ValueError, match=match):
        BenchConfig.load(path)


def test_a_shortened_replay_counts_what_the_simulator_counts_on_the_shortened_trace(tmp_path):
    """replay_decode: N replays each prompt's prefill and first N decode passes; the row says so, and its
    per-layer counts equal the simulator's on ``trace.head(N)`` (what bench_counts.py compares)."""
    from specmd.bench.runner import run
    from specmd.study.sim import simulate
    from specmd.study.trace import load_trace

    spec = tmp_path / "tiny-olmoe.yaml"
    spec.write_text(TINY_SPEC)
    trace = _recorded_trace(spec, tmp_path / "tiny-trace.json.gz")
    path = tmp_path / "bench.yaml"
    path.write_text(f"models: [{spec}]\nbudgets: ['25%']\nprompts: [5]\nnew_tokens: 3\nrepeats: 1\n"
                    "presets: [lru-noprefetch]\nbaselines: [full-gpu-grouped-mm]\n"
                    f"routing: {{{spec}: replay {trace}}}\nreplay_decode: {{{spec}: 2}}\n")
    results = run(BenchConfig.load(path), torch.device("cpu"), progress=False, log=lambda _: None)
    replayed = results["rows"][1]
    assert replayed["replay_decode"] == 2 and replayed["identical_tokens"]
    assert replayed["routing"] == "replay tiny-trace.json.gz (first 2 decode steps per prompt)"
    assert replayed["stats"]["forward_passes"] == 2 + 2 + 2  # of the whole trace's 2 + 4 + 3
    sim = simulate(load_trace(trace).head(2), replayed["num_slots"], "lru", prefetch="none", warm=True)
    counts = ("hits", "misses_cold", "misses_capacity", "misses_collision", "evictions")
    assert [{c: layer[c] for c in counts} for layer in replayed["stats"]["layers"]] == \
        [{c: getattr(layer, c) for c in counts} for layer in sim.layers]


def test_a_replay_timing_without_its_replay_is_refused():
    """replay_seconds times a trace's prompts only under that trace's replay, run to its end: anything else
    would time the model's own routing, or part of the trace, as if it were the trace."""
    import specmd
    from specmd.bench.timing import replay_seconds
    from specmd.tiny import tiny_model

    model = specmd.offload(tiny_model("olmoe"), "50%", device="cpu")
    with pytest.raises(RuntimeError, match="replay_routing"):
        replay_seconds(model, ((4, 2),), 256, torch.device("cpu"))
    model.specmd.close()


def test_compiled_decode_mode_and_its_undoing():
    """The compiled full-GPU reference's settings: a static cache of one fixed length with compilation on; then
    back to a fresh model's (no cache chosen, so a graph offload may choose the static cache) with the
    remembered cache length and compiled call forgotten."""
    from transformers import GenerationConfig

    from specmd.bench.compiled import captures_decode, decode_mode, default_decode_mode, fresh_compile

    class Model:
        generation_config = GenerationConfig()

    model = Model()
    decode_mode(model, compiled=True, cache_len=96)
    config = model.generation_config
    assert (config.cache_implementation, config.max_cache_len, config.disable_compile) == ("static", 96, False)
    decode_mode(model, compiled=False)
    assert (config.cache_implementation, config.max_cache_len, config.disable_compile) == (None, None, True)
    default_decode_mode(model)
    assert (config.cache_implementation, config.max_cache_len, config.disable_compile) == (None, None, False)
    model._previous_max_cache_length, model._compiled_call = 640, object()
    fresh_compile(model)
    assert not hasattr(model, "_previous_max_cache_length") and not hasattr(model, "_compiled_call")
    assert not captures_decode(model)


def test_a_row_whose_tokens_differ_says_where_they_part():
    """Where to look for the cause: the row names the first sequence position that differs in any sequence,
    and nothing when the tokens are equal or not comparable."""
    from specmd.bench.results import first_differing_position, row
    from specmd.bench.timing import Timed

    reference = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    tokens = reference.clone()
    tokens[1, 2] = 0
    tokens[0, 3] = 0
    assert first_differing_position(tokens, reference) == 2
    assert first_differing_position(tokens[:, :3], reference) is None
    differing = row("m", "specmd", "lru", (2, 2), 2, Timed(1.0, 1.0, tokens, 0), reference)
    assert differing["identical_tokens"] is False and differing["first_differing_position"] == 2
    same = row("m", "specmd", "lru", (2, 2), 2, Timed(1.0, 1.0, reference, 0), reference)
    assert same["identical_tokens"] and "first_differing_position" not in same


def test_a_compiled_row_is_checked_against_each_output_of_an_unreproducible_compiled_reference():
    """Where the compiled full-GPU model's own generates differ (its compiled decode step is not reproducible run
    to run in bf16), every output of a compiled row must equal one of them: the row's first that equals none
    is the one checked, against the reference it follows longest; the check says which case it is. With one
    reference output it is the plain check of the row's last output."""
    from types import SimpleNamespace

    from specmd.bench.results import distinct_outputs
    from specmd.bench.runner import ModelBench

    first, second = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]])
    other, near = torch.tensor([[1, 5, 5, 5]]), torch.tensor([[1, 2, 3, 6]])
    assert [t.tolist() for t in distinct_outputs([first, first.clone(), second, first])] == [[[1, 2, 3, 4]],
                                                                                            [[1, 2, 3, 5]]]
    bench = ModelBench.__new__(ModelBench)
    bench.model = SimpleNamespace(specmd=SimpleNamespace(set_static_cache=True))  # decode steps are CUDA graphs
    bench.reference, bench.compiled_reference = {(4, 1): other}, {(4, 1): second}
    bench.compiled_outputs = {(4, 1): [first, second]}
    reference, tokens, check = bench._reference((4, 1), [second, first.clone()])
    assert torch.equal(reference, first) and torch.equal(tokens, first) and "2 each equal one of them" in check
    reference, tokens, check = bench._reference((4, 1), [near, first])  # the last matches, the first does not
    assert torch.equal(tokens, near) and not torch.equal(reference, near) and "do not all equal" in check
    reference, tokens, _ = bench._reference((4, 1), [other])
    assert torch.equal(tokens, other) and torch.equal(reference, first)  # parts at position 1 from both: the first
    bench.compiled_outputs = {(4, 1): [second]}
    reference, tokens, check = bench._reference((4, 1), [second, first])
    assert torch.equal(reference, second) and torch.equal(tokens, first)
    assert check == "compiled, against the compiled full-GPU model"


def test_measure_keeps_every_full_length_output():
    """The warm-up (when full length) and each repeat: what an unreproducible reference is checked against."""
    from specmd.bench.timing import measure
    from specmd.tiny import tiny_model

    model = tiny_model("olmoe")
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert len(measure(model, ids, 3, repeats=2).outputs) == 3
        timed = measure(model, ids, 3, repeats=2, warmup_tokens=1)
    assert len(timed.outputs) == 2 and all(torch.equal(out, timed.tokens) for out in timed.outputs)
