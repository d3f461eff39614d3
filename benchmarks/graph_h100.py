"""The graph engine against the threaded engine and the full-GPU model, on the GPU, in one process.

OLMoE-1B-7B shapes, random bf16 weights (random routing: degenerate, see the README), prompts of 16 (and
512) tokens, 64 new tokens. Rows:
  - full GPU, transformers' default kernels, uncompiled (dynamic cache) and compiled (static cache: generate
    compiles the decode step with its default CompileConfig, mode "reduce-overhead", CUDA graphs);
  - the threaded engine, no prefetch (uncompiled: its host loop cannot be traced);
  - the graph engine uncompiled (each layer's step replayed as a CUDA graph) and compiled (the whole decode
    step one CUDA graph, as ``generate`` runs it by default on CUDA) at each budget.
Tokens: uncompiled rows against the uncompiled full-GPU model, compiled rows against the compiled one.
Link floor of a budget: bytes gathered per decoded token / the pinned copy rate measured in this run.
Host calls per decode step, from torch's profiler (a 17-token generate minus a 9-token one, over 8 steps):
stream, device and event synchronizations, device->host copies, graph launches and kernel launches (the
full-GPU rows show what generate itself does per step). Kernel launches are in the JSON only: for the
engines they do not cancel out (the two prefills run different numbers of chunks).

    python benchmarks/graph_h100.py --out DIR [--budgets 100% 50% 5%] [--prompts 16 512] [--threaded [B ...]] [--trace T]
        [--graph-prefetch none topk:1 topk:2] [--modes per-layer compiled] [--profile]
    python benchmarks/graph_h100.py --device cpu ...   # a smoke run of the logic on a tiny model (no figures)
    # prints a table last; DIR/graph.json holds everything, written after every row
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import traceback
from pathlib import Path

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

import specmd
from specmd.bench.compiled import decode_mode, fresh_compile
from specmd.bench.models import build_model
from specmd.bench.results import distinct_outputs, unmatched_outputs
from specmd.bench.timing import copy_gbps, measure, replay_seconds
from specmd.runtime.adapters import find_moe_layers
from specmd.study.costmodel import ModelSpec
from specmd.tiny import TINY_CONFIGS, tiny_model

NEW_TOKENS = 64
DEVICE = torch.device("cuda", 0)  # --device cpu: a smoke run of this script's logic on a tiny model (no figures)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def cpu_compile_config(model) -> None:
    """On the CPU, generate compiles only when told to, and the smoke run needs dynamo's tracing, not inductor."""
    if DEVICE.type == "cpu":
        from transformers import CompileConfig

        config = CompileConfig(backend="eager")
        config._compile_all_devices = True
        model.generation_config.compile_config = config
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _host_calls(model, ids: torch.Tensor, new_tokens: int) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        sync()
    names = [e.name for e in prof.events()]
    count = lambda pred: sum(1 for n in names if pred(n))  # noqa: E731
    return {"syncs": count(lambda n: n in SYNC_NAMES), "dtoh": count(lambda n: "DtoH" in n),
            "graph_launches": count(lambda n: n == "cudaGraphLaunch"),
            "kernel_launches": count(lambda n: n in KERNEL_LAUNCHES)}


def host_calls_per_step(model, ids: torch.Tensor) -> dict:
    """Per decode step: synchronizations, device->host copies, graph and kernel launches, from the CUDA
    runtime calls torch's profiler records; the difference between a 17- and a 9-token generate, over the 8
    extra decode steps (the prefill and generate's set-up cancel out)."""
    short, long = _host_calls(model, ids, 9), _host_calls(model, ids, 17)
    return {name: (long[name] - short[name]) / 8 for name in short}


def families(compiled: bool) -> dict:
    """Every family's tiny model in bf16 through the graph engine, tokens against transformers in the same
    mode (compiled: static cache and generate's compiled decode on both sides)."""
    out = {}
    for family in sorted(TINY_CONFIGS):
        ref = tiny_model(family, dtype=torch.bfloat16).to(DEVICE)
        cpu_compile_config(ref)
        decode_mode(ref, compiled)
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        want = ref.generate(ids, **kwargs)
        expert = find_moe_layers(ref)[0].layout.expert_bytes
        same = []
        # compiled: one budget (each offload compiles afresh); then that budget again with top-k prefetch
        top_k = ref.config.num_experts_per_tok
        budgets = [(2 * top_k * expert, "none"), ("50%", "none")][:1 if compiled else 2]
        for budget, prefetch in budgets + [(4 * top_k * expert, "topk")]:
            fresh_compile(ref)
            specmd.offload(ref, budget, "lru", DEVICE.type, engine="graph", prefetch=prefetch, progress=False)
            decode_mode(ref, compiled)
            same.append(bool(torch.equal(ref.generate(ids, **kwargs), want)))
            ref.specmd.close()
        out[family] = same
        del ref
    return out


def profile_steps(model, ids, out: Path, name: str) -> None:
    """The CUDA API and kernel trace of an 8-step decode (a 9-token generate), for chrome://tracing, and its
    kernels by GPU time: what a step spends, and that no synchronize or device->host copy sits inside it."""
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9, do_sample=False)
        sync()
    prof.export_chrome_trace(str(out / f"trace-{slug}.json"))
    with open(out / f"trace-{slug}.json", "rb") as raw, gzip.open(out / f"trace-{slug}.json.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)  # the raw trace is tens of MB
    (out / f"trace-{slug}.json").unlink()
    (out / f"kernels-{slug}.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def compile_counters() -> dict:
    """What torch.compile did since the last ``fresh_compile``: graphs traced, graph breaks, and the reasons
    it ran a graph without CUDA graphs (a step that is not one graph launch shows up here)."""
    counters = torch._dynamo.utils.counters
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "graph_break_reasons": sorted(counters["graph_break"])[:5]}


def guarded(rows: list, name: str, run) -> None:
    """One row; a failure is recorded as the row's error and the next row runs (one broken configuration
    must not cost the device time of the others)."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON, never hidden
        traceback.print_exc()
        rows.append({"name": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
        handle = getattr(_MODEL, "specmd", None)
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc()


_MODEL = None  # the model under test, for ``guarded`` to close its handle after a failure


def _same(timed, reference: dict, compiled: bool) -> bool:
    """A row's tokens against the full-GPU model's in the same mode. The compiled model's generates may differ
    from one another (its compiled step is not reproducible run to run in bf16: seen on Qwen1.5-MoE); then every
    full-length output of a compiled row must equal one of them. Uncompiled rows: the last output, exactly."""
    if not compiled or len(reference["outputs"]) <= 1:
        return bool(torch.equal(timed.tokens, reference["tokens"]))
    return not unmatched_outputs(timed.outputs, reference["outputs"])


def run_row(model, ids, name: str, full: dict, rate: float, out: Path, rows: list, compiled: bool,
            profiled: bool = False) -> None:
    decode_mode(model, compiled)
    timed = measure(model, ids, NEW_TOKENS, 3, before_last=model.specmd.reset_stats)
    stats = model.specmd.stats()
    decode_bytes = stats.total.bytes_copied  # the last generate: prefill + 63 decode steps
    reference = full["compiled" if compiled else "eager"]
    row = {"name": name, "prompt": ids.shape[1], "compiled": compiled, "ttft_ms": timed.ttft_ms,
           "tpot_ms": timed.tpot_ms, "vs_full": timed.tpot_ms / reference["tpot_ms"],
           "same": _same(timed, reference, compiled), "reference_outputs": len(reference["outputs"]),
           "hit_rate": stats.hit_rate,
           "gb_per_token": decode_bytes / NEW_TOKENS / 1e9,
           "link_floor_ms": decode_bytes / NEW_TOKENS / (rate * 1e9) * 1e3,
           "captured_layer_graphs": getattr(model.specmd.engine, "captured_graphs", None),
           **host_calls_per_step(model, ids), **compile_counters(), "stats": stats.to_dict()}
    if profiled and DEVICE.type == "cuda":
        profile_steps(model, ids, out, f"{name} prompt {ids.shape[1]}")
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}), flush=True)
    (out / "graph.json").write_text(json.dumps({"copy_gbps": rate, "rows": rows}, indent=1))


def replayed_row(model, trace, budget: str, compiled: bool, rate: float, prefetch: tuple[str, int],
                 eviction: str = "lru") -> dict:
    """The graph engine on the trace's learned routing (random weights, so tokens are not checked). TPOT:
    (time of the whole replay, after a warm-up replay, - time of its prefills alone, right after) / decode steps; TTFT: the
    prefills' mean. Warmed up (and compiled) by a first whole replay. With prefetch, the trace's recorded
    candidates are prefetched (its learned predictor, not the random routers)."""
    policy, depth = prefetch
    options = dict(engine="graph", prefetch=policy, lookahead=depth, progress=False)
    label = _label(policy, depth)
    fresh_compile(model)
    specmd.offload(model, budget, eviction, DEVICE.type, **options)
    decode_mode(model, compiled)
    model.specmd.replay_routing(trace)
    replay_seconds(model, trace.prompts, model.config.vocab_size, DEVICE)  # warm-up: compiles, records the graphs
    model.specmd.rewind_replay()  # the same replay: its tensors keep their addresses, the graphs stay
    model.specmd.reset_stats()
    whole = replay_seconds(model, trace.prompts, model.config.vocab_size, DEVICE)
    stats = model.specmd.stats()
    # the prefills on the same handle, after the whole replay, as the whole replay's ran after its warm-up
    model.specmd.replay_routing(trace.prefills())
    prefills = replay_seconds(model, trace.prompts, model.config.vocab_size, DEVICE, prefill_only=True)
    model.specmd.close()
    decode_steps = sum(decode for _, decode in trace.prompts)
    mode = "compiled" if compiled else "per-layer graphs"
    if label:
        mode += f", {label} from the trace"
    return {"name": f"graph {eviction} @ {budget} ({mode}, replayed trace)", "prompt": trace.prompts[0][0],
            "compiled": compiled, "ttft_ms": prefills / len(trace.prompts) * 1e3,
            "tpot_ms": (whole - prefills) / decode_steps * 1e3, "same": None, "hit_rate": stats.hit_rate,
            "link_floor_ms": stats.total.bytes_copied / (decode_steps + len(trace.prompts)) / (rate * 1e9) * 1e3,
            "stats": stats.to_dict()}


def _prefetch(text: str) -> tuple[str | dict, int]:
    """POLICY[:LOOKAHEAD[:PROGRAMS[:K]]] -> (offload's prefetch, lookahead); PROGRAMS: the prefetch gathers'
    programs (PrefetchConfig.gather_programs; 0: the full grid; empty: the default); K: the candidates
    prefetched per looked-ahead layer (PrefetchConfig.k; default top-k)."""
    policy, depth, programs, k = (text.split(":") + ["", "", ""])[:4]
    spec = {"policy": policy}
    if programs:
        spec["gather_programs"] = int(programs)
    if k:
        spec["k"] = int(k)
    return (spec if len(spec) > 1 else policy), int(depth or 1)


def _label(spec: str | dict, depth: int) -> str:
    """'' without prefetch, else e.g. 'topk d1', 'topk d1 p33' or 'topk d1 k2'."""
    if isinstance(spec, dict):
        return f"{spec['policy']} d{depth}" + (f" p{spec['gather_programs']}" if "gather_programs" in spec else "") \
            + (f" k{spec['k']}" if "k" in spec else "")
    return "" if spec == "none" else f"{spec} d{depth}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", nargs="+", default=["100%", "50%", "20%", "10%", "5%"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[16, 512])
    parser.add_argument("--families", choices=["none", "eager", "compiled", "both"], default="both")
    parser.add_argument("--threaded", nargs="*", default=None,
                        help="also the threaded engine at these budgets (none named: at each budget)")
    parser.add_argument("--trace", default=None, help="also the graph engine on this trace's routing (replayed)")
    parser.add_argument("--trace-budgets", nargs="+", default=None, help="the budgets of the replayed rows (default: all)")
    parser.add_argument("--modes", nargs="+", choices=["per-layer", "compiled"], default=["per-layer", "compiled"],
                        help="the graph engine's decode: per-layer CUDA graphs (uncompiled), the compiled step")
    parser.add_argument("--graph-prefetch", nargs="+", type=_prefetch, default=[("none", 1)],
                        help="the graph engine's prefetch rows, POLICY[:LOOKAHEAD] each (e.g. none topk:1 topk:2)")
    parser.add_argument("--evictions", nargs="+", default=["lru"],
                        help="the graph engine's eviction policies (its rows, replayed ones included, per policy)")
    parser.add_argument("--threaded-prefetch", nargs="+", type=_prefetch, default=[("none", 1)],
                        help="the threaded engine's prefetch rows, POLICY[:LOOKAHEAD] each")
    parser.add_argument("--profile-budgets", nargs="+", default=None,
                        help="write a profiler trace and kernel table of the compiled graph rows at these budgets")
    parser.add_argument("--trace-only", action="store_true",
                        help="only the replayed-trace rows (no full-GPU rows, no rows under the random routers)")
    parser.add_argument("--profile", action="store_true",
                        help="write a profiler trace and kernel table of each compiled graph row (DIR/trace-*.json)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the script on a tiny model of the trace's topology (no figures)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global DEVICE
    DEVICE = device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        model = build_model(ModelSpec.load("olmoe-1b-7b-0924"), device, place="device")[0]
    else:  # the OLMoE topology (so a trace of it replays), tiny sizes
        model = tiny_model("olmoe", num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, dtype=torch.bfloat16)
    cpu_compile_config(model)
    # transformers' default kernels: generate decodes with batched_mm (on a GPU; the CPU smoke run asks for it)
    model.set_experts_implementation("grouped_mm" if device.type == "cuda" else "batched_mm")
    expert_bytes = find_moe_layers(model)[0].layout.expert_bytes
    rate = copy_gbps(expert_bytes, device) if device.type == "cuda" else float("nan")
    rows: list[dict] = []
    with torch.inference_mode():
        prompts = {prompt: torch.randint(10, min(50000, model.config.vocab_size), (1, prompt),
                                         generator=torch.Generator().manual_seed(0)).to(device)
                   for prompt in args.prompts}
        fulls = {}  # every prompt's full-GPU rows first: once offloaded (and closed), the model runs only offloaded
        for prompt, ids in ({} if args.trace_only else prompts).items():
            full = fulls[prompt] = {}
            for compiled in (False, True):
                fresh_compile(model)
                decode_mode(model, compiled)
                timed = measure(model, ids, NEW_TOKENS, 3)
                mode = "compiled" if compiled else "eager"
                # every full-length output: a compiled model's generates may differ from one another (``_same``)
                full[mode] = {"tpot_ms": timed.tpot_ms, "tokens": timed.tokens,
                              "outputs": distinct_outputs(timed.outputs)}
                row = {"name": f"full GPU {mode}", "prompt": prompt, "compiled": compiled, "ttft_ms": timed.ttft_ms,
                       "tpot_ms": timed.tpot_ms, "same": True, "distinct_outputs": len(full[mode]["outputs"]),
                       **host_calls_per_step(model, ids)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        model.generation_config.cache_implementation = None
        global _MODEL
        _MODEL = model
        for prompt, ids in ({} if args.trace_only else prompts).items():
            full = fulls[prompt]
            for budget in args.budgets:
                if args.threaded is not None and (not args.threaded or budget in args.threaded):
                    for policy, depth in args.threaded_prefetch:
                        label = _label(policy, depth)
                        name = f"threaded lru @ {budget}" + (f" ({label})" if label else "")

                        def threaded_row(budget=budget, policy=policy, depth=depth, name=name, ids=ids, full=full):
                            fresh_compile(model)
                            specmd.offload(model, budget, "lru", DEVICE.type, engine="threaded", prefetch=policy,
                                           lookahead=depth, progress=False)
                            run_row(model, ids, name, full, rate, out, rows, compiled=False)
                            model.specmd.close()
                        guarded(rows, name, threaded_row)
                for eviction, compiled, (policy, depth) in [(e, mode == "compiled", p) for e in args.evictions
                                                            for mode in args.modes for p in args.graph_prefetch]:
                    mode = "compiled" if compiled else "per-layer graphs"
                    if _label(policy, depth):
                        mode += f", {_label(policy, depth)}"
                    name = f"graph {eviction} @ {budget} ({mode})"

                    def graph_row(budget=budget, policy=policy, depth=depth, name=name, compiled=compiled, ids=ids,
                                  full=full, eviction=eviction):
                        fresh_compile(model)
                        specmd.offload(model, budget, eviction, DEVICE.type, engine="graph", prefetch=policy,
                                       lookahead=depth, progress=False)
                        profiled = compiled and (args.profile or budget in (args.profile_budgets or ()))
                        run_row(model, ids, name, full, rate, out, rows, compiled, profiled=profiled)
                        model.specmd.close()
                    guarded(rows, name, graph_row)
        if args.trace:
            from specmd.study.trace import load_trace

            trace = load_trace(args.trace)
            for budget in args.trace_budgets or args.budgets:
                for eviction, compiled, prefetch in [(e, mode == "compiled", p) for e in args.evictions
                                                     for mode in args.modes for p in args.graph_prefetch]:
                    def trace_row(budget=budget, compiled=compiled, prefetch=prefetch, eviction=eviction):
                        row = replayed_row(model, trace, budget, compiled, rate, prefetch, eviction)
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "stats"}), flush=True)
                        (out / "graph.json").write_text(json.dumps({"copy_gbps": rate, "rows": rows}, indent=1))
                    guarded(rows, f"graph {eviction} @ {budget} (replayed trace, {prefetch})", trace_row)
    model = _MODEL = None  # the families' models need the memory
    fresh_compile_families = {}
    if args.families in ("eager", "both"):
        fresh_compile_families["eager"] = families(compiled=False)
    if args.families in ("compiled", "both"):
        fresh_compile_families["compiled"] = families(compiled=True)
    result = {"copy_gbps": rate, "rows": rows, "families_bf16": fresh_compile_families,
              "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)",
              "torch": torch.__version__}
    (out / "graph.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"pinned copy of one expert: {rate:.1f} GB/s; bf16 families through the graph engine, tokens equal "
          f"(2k experts, 50%, 4k experts with top-k prefetch; compiled: 2k, 4k with prefetch): {fresh_compile_families}")
    print(f"{'configuration':<50}{'prompt':>7}{'TTFT ms':>9}{'TPOT ms':>9}{'x full':>7}{'floor ms':>9}{'hit %':>7}"
          f"{'syncs':>6}{'DtoH':>5}{'graphs':>7}  same")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<50} FAILED: {r['error'][:120]}")
            continue
        floor = f"{r['link_floor_ms']:.2f}" if "link_floor_ms" in r else "-"
        hit = f"{100 * r['hit_rate']:.1f}" if "hit_rate" in r else "-"
        ratio = f"{r['vs_full']:.2f}" if "vs_full" in r else "-"
        print(f"{r['name']:<50}{r['prompt']:>7}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.2f}{ratio:>7}{floor:>9}{hit:>7}"
              + (f"{r['syncs']:>6.1f}{r['dtoh']:>5.1f}{r['graph_launches']:>7.1f}" if "syncs" in r else f"{'-':>18}")
              + f"  {'-' if r['same'] is None else 'yes' if r['same'] else 'NO'}")


if __name__ == "__main__":
    main()
