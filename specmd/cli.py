"""Command line: ``specmd run`` generates text through specmd and prints the cache statistics;
``specmd trace`` records routing traces; ``specmd sim`` replays one through the cache policies;
``specmd bench`` runs a benchmark matrix on the GPU and writes JSON, Markdown and PNG results."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

# `--model tiny` (and `make run` where the shipped checkpoint is missing): a tiny OLMoE whose 256-token vocabulary
# is read as bytes, so text goes in and (random-weight) text comes out without a tokenizer download.
RUN_MODEL = dict(family="olmoe", num_hidden_layers=4, num_experts=32, num_experts_per_tok=4, hidden_size=128,
                 intermediate_size=64)


def _model_path(path: str | None) -> str:
    """The checkpoint a command runs: ``path``, else the shipped one, else "tiny"."""
    from .shipped import SHIPPED_MODEL

    if path is None:
        return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "config.json").exists() else "tiny"
    return path


def _load(path: str, settings: dict, dtype: str | None):
    """(model offloaded with ``settings``, encode, decode): a local checkpoint with its tokenizer, or, with
    ``path="tiny"``, a tiny random model with bytes as tokens. ``settings`` and ``dtype`` are checked
    before anything is loaded."""
    import specmd
    from specmd.api import offload_config
    from specmd.config import parse_dtype
    from specmd.tiny import tiny_model

    offload_config(**settings)
    parse_dtype(dtype)
    if path != "tiny":
        from transformers import AutoTokenizer

        model = specmd.from_pretrained(path, dtype=dtype, **settings)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, (lambda s: tokenizer(s, return_tensors="pt").input_ids), tokenizer.decode
    kwargs = {k: v for k, v in RUN_MODEL.items() if k != "family"}
    model = specmd.offload(tiny_model(RUN_MODEL["family"], **kwargs), **settings)
    encode = lambda s: torch.tensor([list(s.encode("utf-8"))])  # noqa: E731
    decode = lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    return model, encode, decode


def cmd_run(args: argparse.Namespace) -> int:
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens {args.new_tokens}: generate at least 1 token")
    # A preset's own budget wins over the command line's default.
    budget = args.budget or (None if args.preset else "25%")
    settings = dict(expert_budget=budget, engine=args.engine, eviction=args.eviction, device=args.device,
                    prefetch=args.prefetch, lookahead=args.lookahead, preset=args.preset)
    model, encode, decode = _load(_model_path(args.model), settings, args.dtype)
    ids = encode(args.prompt).to(model.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    stats, config = model.specmd.stats(), model.specmd.config
    print(f"device: {model.device}  engine: {config.engine}  eviction: {config.eviction}  prefetch: {config.prefetch.policy} "
          f"(lookahead {config.prefetch.lookahead})  budget: {config.expert_budget}  slots: {stats.num_slots}")
    if model.specmd.load_report is not None:
        print(f"checkpoint: {model.specmd.load_report.summary()}")
    print(f"prompt: {args.prompt!r}")
    print(f"output: {decode(out[0, ids.shape[1]:])!r}")
    print(f"{args.new_tokens} tokens in {seconds:.2f} s (wall clock)")
    print(stats.summary())
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.to_dict(), indent=1))
    model.specmd.close()
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    if not 1 <= args.lookahead <= 3:
        raise ValueError(f"--lookahead {args.lookahead}: a trace records predictions 1, 2 or 3 layers ahead")
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens {args.new_tokens}: generate at least 1 token")
    prompts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts (one per line)")
    path = _model_path(args.model)
    model, encode, _ = _load(path, dict(expert_budget=args.budget, device=args.device), args.dtype)
    recorder = model.specmd.record_routing(lookahead=args.lookahead, model=Path(path).name)
    with torch.inference_mode():
        for prompt in prompts:
            ids = encode(prompt).to(model.device)
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    recorder.save(args.out)
    print(f"{len(recorder.passes)} forward passes of {len(prompts)} prompts -> {args.out}")
    model.specmd.close()
    return 0


def sim_capacity(budget: str, total_experts: int, expert_bytes: int | None) -> int:
    """A simulator budget in experts (at least one): a bare whole number counts experts (the convention of
    routing traces); fractions, percentages and 'N experts' as ``specmd run`` takes them; sizes need one
    expert's bytes."""
    from .config import Budget

    forms = "experts (38), a fraction (0.05), a percentage (5%) or a size (600MB, with --model-timing)"
    try:
        spec = Budget.parse(f"{budget} experts" if budget.strip().isdigit() else budget)
    except ValueError:
        raise ValueError(f"sim --budget {budget!r} is not a budget; pass {forms}") from None
    if spec.kind == "auto":
        raise ValueError(f"sim --budget 'auto': 'auto' measures free GPU memory; pass {forms}")
    if spec.kind == "bytes" and expert_bytes is None:
        raise ValueError(f"sim --budget {budget!r}: a size needs the size of one expert; pass --model-timing "
                         "(configs/models/ name or YAML), or give experts (38), a fraction (0.05) or a percentage")
    if spec.kind == "fraction":
        capacity = int(spec.value * total_experts)  # rounded down, as shared/traces/README.md does
    elif spec.kind == "experts":
        capacity = int(spec.value)
    else:
        capacity = int(spec.value) // expert_bytes
    if capacity < 1:
        raise ValueError(f"sim --budget {budget!r} is less than one expert of {total_experts}; pass at least 1 "
                         "(a whole number counts experts) or a larger share")
    return capacity


SIM_EVICTIONS = ["lru", "lfu", "fifo", "layer-distance", "least-stale", "belady"]  # sim's default comparison


def cmd_sim(args: argparse.Namespace) -> int:
    from .bench.report import hit_rate_plot, markdown_table
    from .runtime.device_policies import DEVICE_POLICIES
    from .study.costmodel import LinkProfile, ModelTiming
    from .study.graph_sim import GraphTiming, simulate_graph
    from .study.sim import simulate
    from .study.trace import load_trace

    graph = args.engine == "graph"
    trace = load_trace(args.trace)
    total = trace.num_layers * trace.num_experts
    timing = None
    if args.hardware or args.model_timing:
        if not (args.hardware and args.model_timing):
            raise ValueError("time estimates need both --hardware (link) and --model-timing (expert size, layer time)")
        model = ModelTiming.load(args.model_timing)
        timing = GraphTiming(_graph_link(args.hardware), model) if graph else \
            (LinkProfile.load(args.hardware), model)
    expert_bytes = (timing.model if graph else timing[1]).expert_bytes if timing else None
    capacities = [(b, sim_capacity(b, total, expert_bytes)) for b in args.budget.split(",")]
    evictions = args.eviction.split(",") if args.eviction else (sorted(DEVICE_POLICIES) if graph else SIM_EVICTIONS)
    rows = []
    for budget, capacity in capacities:
        for eviction in evictions:
            if graph:  # the graph engine's schedule and device cache (device policies only)
                stats = simulate_graph(trace, capacity, eviction, args.prefetch, args.lookahead, args.k,
                                       warm=args.warm, timing=timing)
            else:
                stats = simulate(trace, capacity, eviction, seed=args.seed, prefetch=args.prefetch,
                                 lookahead=args.lookahead, k=args.k, timing=timing, warm=args.warm)
            rows.append({"budget": budget, "capacity": capacity, "total_experts": total, "eviction": eviction,
                         "engine": args.engine, "prefetch": args.prefetch, "lookahead": args.lookahead,
                         **stats.to_dict()})
            print(_sim_line(budget, capacity, total, eviction, stats, timing is not None, graph))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.table:
        Path(args.table).write_text(markdown_table(rows))
    if args.plot:
        hit_rate_plot(rows, args.plot, title=f"{Path(args.trace).name}, prefetch {args.prefetch}")
    return 0


def _graph_link(name: str):
    """A graph link profile, with an error that says which kind ``--engine graph`` needs."""
    from .study.costmodel import GraphLink

    try:
        return GraphLink.load(name)
    except ValueError as err:
        raise ValueError(f"--engine graph prices the graph engine's gathers: pass a graph link profile "
                         f"(gather_gbps, prefetch_gbps, overhead_ms) such as --hardware h200-graph-measured ({err})"
                         ) from None


def _sim_line(budget: str, capacity: int, total: int, eviction: str, stats, timed: bool, graph: bool = False) -> str:
    t = stats.total
    line = (f"{budget:>6} ({capacity:>4} of {total}) {eviction:<15} hit {100 * stats.hit_rate:5.1f}%  "
            f"misses {t.misses:>6} (cold {t.misses_cold}, capacity {t.misses_capacity}, "
            f"collision {t.misses_collision})  evictions {t.evictions}")
    if graph and t.prefetches:
        line += f"  prefetches {t.prefetches} (hits {t.prefetch_hits})"
    if timed:
        line += f"  est. TTFT {stats.estimated_ttft_ms or 0:.1f} ms TPOT {stats.estimated_tpot_ms:.1f} ms"
        if not graph:  # the threaded timeline's copy engine; the graph model prices copies per layer
            line += f" stall {stats.stall_ms:.0f} ms copy {stats.copy_busy_ms:.0f} ms"
    return line


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.config import BenchConfig

    config = BenchConfig.load(args.config)  # a malformed config fails first, naming the key
    if any(part is not None for part in (args.budgets, args.baselines, args.presets, args.models)):
        config = config.overridden(args.config, args.budgets, args.baselines, args.presets, args.models)
    if not torch.cuda.is_available():
        print("specmd bench: needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
              "run it on the GPU machine", file=sys.stderr)
        return 1
    from .bench.report import default_out_dir, summary_table, write_results
    from .bench.runner import run

    device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out) if args.out else default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.config).stem
    print(f"specmd bench: {args.config}: {config.num_runs} specmd runs + baselines -> {out_dir}", file=sys.stderr)
    results = run(config, device, log=lambda text: print(text, file=sys.stderr),
                  on_row=lambda partial: write_results(partial, out_dir, stem, plots=False))
    files = write_results(results, out_dir, stem)
    print(summary_table(results))
    print("wrote " + ", ".join(str(f) for f in files))
    # Baselines may round differently (transformers' eager vs grouped_mm); specmd must not.
    return 0 if all(r["identical_tokens"] is not False for r in results["rows"] if r["kind"] == "specmd") else 2


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: ``run``, ``trace``, ``sim`` and ``bench``."""
    from . import __version__
    from .config import BUDGET_FORMS

    parser = _Parser(prog="specmd", description="Expert offloading for Hugging Face MoE models")
    parser.add_argument("--version", action="version", version=f"specmd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text through specmd and print the cache statistics")
    run.add_argument("--model", help="local checkpoint directory (default: the shipped checkpoint; 'tiny' for a "
                                     "random tiny OLMoE with bytes as tokens)")
    run.add_argument("--preset", help="policy preset: a name in configs/policies/ or a YAML path")
    run.add_argument("--budget", help=f"expert budget: {BUDGET_FORMS} (default 25%%)".replace("%", "%%"))
    run.add_argument("--eviction", help="eviction policy (default least-stale)")
    run.add_argument("--prefetch", help="none, topk, top-p or threshold (default none)")
    run.add_argument("--lookahead", type=int, help="layers predicted ahead, 1..3")
    run.add_argument("--device", help="cuda, cpu (default: CUDA when available)")
    run.add_argument("--engine", help="threaded (default) or graph (the cache decided on the device)")
    run.add_argument("--dtype", default=None, help="dtype for --model, e.g. bfloat16")
    run.add_argument("--prompt", default="def fibonacci(n):")
    run.add_argument("--new-tokens", type=int, default=32)
    run.add_argument("--stats-json", help="also write the statistics here")
    trace = sub.add_parser("trace", help="record routing traces (ids, weights, predictions) from a model")
    trace.add_argument("model", nargs="?", default=None,
                       help="local checkpoint directory (default: the shipped checkpoint), or 'tiny'")
    trace.add_argument("--prompts", required=True, help="text file, one prompt per line")
    trace.add_argument("--out", required=True, help="trace file to write (JSON, format in README)")
    trace.add_argument("--new-tokens", type=int, default=64)
    trace.add_argument("--lookahead", type=int, default=3, help="record predictions 1..N layers ahead")
    trace.add_argument("--budget", default="100%", help="expert budget while recording")
    trace.add_argument("--device", help="cuda, cpu (default: CUDA when available)")
    trace.add_argument("--dtype", default=None)
    bench = sub.add_parser("bench", help="the benchmark matrix on a GPU (configs/bench/*.yaml)")
    bench.add_argument("config", help="bench config YAML, e.g. configs/bench/default.yaml")
    bench.add_argument("--out", help="results folder (default benchmarks/results/<date>-<gpu>/)")
    bench.add_argument("--budgets", help="run these budgets instead of the config's (comma list, e.g. 5%%,10%%): "
                                         "one part of a long matrix; benchmarks/merge_bench.py joins the parts")
    bench.add_argument("--baselines", help="run these baselines instead of the config's (comma list, or none)")
    bench.add_argument("--presets", help="run these presets instead of the config's (comma list)")
    bench.add_argument("--models", help="run only these of the config's models (comma list)")
    sim = sub.add_parser("sim", help="replay a routing trace through the cache policies")
    sim.add_argument("trace", help="routing trace file (see README)")
    sim.add_argument("--budget", default="5%,10%,25%,50%",
                     help="comma-separated: experts (38), a fraction (0.05), percent (5%%), or a size (600MB, with "
                          "--model-timing)")
    sim.add_argument("--eviction", default=None,
                     help="comma-separated eviction policies (default: lru,lfu,fifo,layer-distance,least-stale,"
                          "belady; with --engine graph, its device policies); 'belady' is the oracle")
    sim.add_argument("--engine", choices=["threaded", "graph"], default="threaded",
                     help="whose schedule: the threaded engine's (slot cache, inline prefetch) or the graph "
                          "engine's (device cache, prefetch within the pass; its counts equal a live replay's)")
    sim.add_argument("--prefetch", default="none", help="none, topk (recorded predictions) or perfect (the bound)")
    sim.add_argument("--lookahead", type=int, default=1)
    sim.add_argument("--k", type=int, default=None, help="candidates prefetched per layer (default: top-k)")
    sim.add_argument("--warm", action="store_true",
                     help="replay the trace once uncounted first, as a live bench row warms up (not with belady)")
    sim.add_argument("--hardware", help="link profile for time estimates: configs/hardware/ name or YAML (--engine "
                                        "graph: a graph link profile, e.g. h200-graph-measured)")
    sim.add_argument("--model-timing", help="expert size and layer time: configs/models/ name or YAML")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", help="write the statistics as JSON")
    sim.add_argument("--table", help="write a Markdown table (hit rate / collision misses per budget)")
    sim.add_argument("--plot", help="write a PNG: hit rate against budget per policy, Belady dashed")
    return parser


def _attach_values(argv: list[str]) -> list[str]:
    """``--budget -5%`` as ``--budget=-5%``: argparse reads a value starting with '-' as an option, which
    hides the real problem (a negative budget) behind "expected one argument"."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--budget", "--lookahead", "--new-tokens") and re.match(r"-[0-9.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"run": cmd_run, "trace": cmd_trace, "sim": cmd_sim, "bench": cmd_bench}[args.command](args)
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        # A user's input (or machine) problem: one line, no traceback. Bugs are not caught here.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"specmd: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
