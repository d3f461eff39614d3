"""The GPU runner of ``specmd bench``: baselines and specmd presets on the same model, in one process.

Per model of the config (random weights, built on the GPU when the whole model fits there; else built
straight into place by ``specmd.from_config``, non-expert weights on the GPU and experts in the host
store, when those fit; else skipped with a message): the full-GPU baselines when the model fits
(transformers' eager experts and its default grouped_mm; the latter's tokens are the reference, else the
first specmd configuration's are), then every budget x link x preset x prompt x batch through specmd,
then on-demand loading (one layer's top-k slots, nothing reused) per link, and last
``device_map="auto"`` with ``max_memory`` equal to specmd's VRAM (non-expert weights + expert budget),
which rebuilds the model's placement and so ends its use.

Timing: a warm-up (full length for the full-GPU baselines, a few tokens for specmd runs, whose kernels
are warm by then), TTFT as the median of one-token generates, TPOT as
(median full generate - TTFT) / (new tokens - 1); the device is synchronized around every timed call.
Counters (hits, stall, bytes) cover the last full generate. A slower link than the machine's is emulated
by stretching each copy with a GPU sleep (``specmd.linkemu``), calibrated on the machine; the copy rate
that results is measured and recorded next to each result.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench import NATIVE_LINK, BenchConfig
from .config import Budget
from .costmodel import LinkProfile, ModelSpec
from .linkemu import achieved_gbps, sleep_cycles, stretch_seconds
from .machine import host_memory_bytes, machine_info
from .report import bench_label, same_tokens_text

# Device memory kept free when deciding whether a model fits (activations, KV cache, allocator slack).
FIT_HEADROOM_BYTES = 6 * 2**30
# device_map="auto" moves every offloaded weight on every forward (seconds per token at small budgets):
# it is timed over fewer tokens, one repeat, a one-token warm-up.
DEVICE_MAP_NEW_TOKENS = 4
SPECMD_WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Timed:
    ttft_ms: float
    tpot_ms: float
    tokens: torch.Tensor
    peak_vram_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.tpot_ms if self.tpot_ms > 0 else 0.0  # 0: not measured (one token), not infinite


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate, device synchronized before and after, and its output."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    _sync(ids.device)
    return time.perf_counter() - start, out


def measure(model, ids: torch.Tensor, new_tokens: int, repeats: int, ttft_repeats: int = 2,
            before_last=None, warmup_tokens: int | None = None) -> Timed:
    """Warm-up (full length unless ``warmup_tokens``), TTFT (median of one-token generates), TPOT from
    the median full generate. ``before_last`` runs before the last full generate (e.g. to zero counters
    so they cover it)."""
    device = ids.device
    timed_generate(model, ids, warmup_tokens or new_tokens)
    ttft = statistics.median(timed_generate(model, ids, 1)[0] for _ in range(ttft_repeats))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, out = [], None
    for i in range(repeats):
        if i == repeats - 1 and before_last is not None:
            before_last()
        seconds, out = timed_generate(model, ids, new_tokens)
        totals.append(seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    tpot = (statistics.median(totals) - ttft) / max(1, new_tokens - 1)
    return Timed(ttft * 1e3, tpot * 1e3, out, peak)


def copy_gbps(nbytes: int, device: torch.device, stretch_cycles: int = 0, repeats: int = 21,
              warmup: int = 10) -> float:
    """Median rate of a pinned host->device copy of ``nbytes`` on a side stream, stretched as the cache
    stretches its copies when ``stretch_cycles`` > 0. The first ``warmup`` copies are not counted: on
    the 2026-11-23 H100 a cold measurement read 27.7 GB/s where warm copies ran at 41-45 GB/s."""
    source = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    times = []
    with torch.cuda.stream(stream):
        for _ in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            target.copy_(source, non_blocking=True)
            if stretch_cycles:
                torch.cuda._sleep(stretch_cycles)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return achieved_gbps(nbytes, statistics.median(times[warmup:]))


def calibrate_link(nbytes: int, target_gbps: float, device: torch.device, cycles_per_second: float,
                   tolerance: float = 0.05, steps: int = 4) -> tuple[int, float, float]:
    """(stretch cycles, measured emulated GB/s, native GB/s) so a stretched copy of ``nbytes`` runs at
    ``target_gbps``: the stretch from the native rate measured now, then corrected against the measured
    stretched rate until within ``tolerance`` (the sleep's clock and the copy both drift)."""
    native = copy_gbps(nbytes, device)
    cycles = sleep_cycles(stretch_seconds(nbytes, native, target_gbps), cycles_per_second)
    measured = copy_gbps(nbytes, device, cycles) if cycles else native
    for _ in range(steps):
        if abs(measured / target_gbps - 1) <= tolerance or (not cycles and measured < target_gbps):
            break
        missing = nbytes / (target_gbps * 1e9) - nbytes / (measured * 1e9)  # seconds per copy still off
        cycles = max(0, cycles + round(missing * cycles_per_second))
        measured = copy_gbps(nbytes, device, cycles) if cycles else copy_gbps(nbytes, device)
    return cycles, measured, native


def sleep_cycles_per_second(device: torch.device) -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep``, timed with CUDA events."""
    cycles = 50_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(1_000_000)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _sizes_on_meta(spec: ModelSpec) -> tuple[object, int, int, int]:
    """(transformers config, all weight bytes, expert bytes, one expert's bytes) in bf16, from a meta model."""
    from transformers import AutoModelForCausalLM

    from .adapters import find_moe_layers

    config = spec.transformers_config()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = find_moe_layers(meta)
    layout = layers[0].layout
    total = sum(p.numel() * p.element_size() for p in meta.parameters())
    return config, total, layout.layer_bytes * len(layers), layout.expert_bytes


def build_model(spec: ModelSpec, device: torch.device, seed: int = 0, place: str | None = None):
    """(model, placement) with random bf16 weights, initialised where they belong: placement "device", the
    whole model on ``device`` when it fits (the full-GPU baselines can run), else "host": non-expert
    weights on ``device`` and the experts in the host store (``specmd.from_config``; offloaded once and
    closed, so each run offloads it again without copying). ``place`` forces one (tests). Raises
    ``Skip`` when neither fits."""
    import specmd
    from transformers import AutoModelForCausalLM

    config, nbytes, expert_bytes, one_expert = _sizes_on_meta(spec)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    try:
        host = host_memory_bytes()
    except (ValueError, OSError):
        host = None
    gib = 2**30
    if place is None:
        place = "device" if free is None or nbytes + FIT_HEADROOM_BYTES <= free else "host"
    if place == "device" and host is not None and nbytes * 1.2 > host:  # offload pins a copy of the experts
        raise Skip(f"{spec.name}: {nbytes / gib:.1f} GiB of weights do not fit {host / gib:.1f} GiB of host memory")
    if place == "host":
        if free is not None and nbytes - expert_bytes + FIT_HEADROOM_BYTES > free:
            raise Skip(f"{spec.name}: its {(nbytes - expert_bytes) / gib:.1f} GiB of non-expert weights do not "
                       f"fit the device's {free / gib:.1f} GiB free")
        if host is not None and expert_bytes * 1.1 > host:
            raise Skip(f"{spec.name}: {expert_bytes / gib:.1f} GiB of experts do not fit {host / gib:.1f} GiB of "
                       "host memory")
        model = specmd.from_config(config, one_expert, device=str(device), seed=seed, progress=True)
        model.specmd.close()
        return model, place
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval(), place


class Skip(Exception):
    """A configuration that does not fit this machine; reported, not run."""


def _prompts(config: BenchConfig, vocab: int, device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {(n, b): torch.randint(10, vocab - 1, (b, n), generator=gen).to(device)
            for n in config.prompts for b in config.batch}


def _stats_fields(stats) -> dict:
    t = stats.total
    return {"hit_rate": stats.hit_rate, "misses": t.misses, "misses_collision": t.misses_collision,
            "prefetch_hits": t.prefetch_hits, "late_prefetches": t.late_prefetches, "stall_ms": t.stall_ms,
            "copy_busy_ms": stats.copy_busy_ms, "bytes_copied": t.bytes_copied,
            "copy_gbps_achieved": (t.bytes_copied / (stats.copy_busy_ms / 1e3) / 1e9) if stats.copy_busy_ms else None,
            "precision": t.precision, "recall": t.recall, "stats": stats.to_dict()}


def _row(model_name: str, kind: str, name: str, workload: tuple[int, int], new_tokens: int, timed: Timed,
         reference: torch.Tensor | None, **extra) -> dict:
    prompt, batch = workload
    return {"model": model_name, "kind": kind, "name": name, "prompt": prompt, "batch": batch,
            "new_tokens": new_tokens, "ttft_ms": timed.ttft_ms, "tpot_ms": timed.tpot_ms,
            "tokens_per_s": timed.tokens_per_s * batch, "peak_vram_bytes": timed.peak_vram_bytes,
            "identical_tokens": None if reference is None else bool(torch.equal(timed.tokens, reference)), **extra}


def run(config: BenchConfig, device: torch.device, progress: bool = True, log=print, on_row=None) -> dict:
    """Run the matrix on ``device``; returns {machine, config, rows, skipped, ...}. ``on_row(results)`` is
    called after every result (to write files as it goes). On a CPU (tests only: ``specmd bench`` refuses)
    links are not measured and only the native link, specmd and on-demand runs are possible."""
    import specmd
    from tqdm.auto import tqdm

    from .adapters import find_moe_layers

    results = {"machine": machine_info(device), "config": dict(vars(config)), "rows": [], "skipped": [],
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows = results["rows"]
    cuda = device.type == "cuda"

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(results)

    def skip(why: str) -> None:
        log(f"skip: {why}")
        results["skipped"].append(why)

    cps = sleep_cycles_per_second(device) if cuda else None
    results["sleep_cycles_per_second"] = cps
    for model_path in config.models:
        spec = ModelSpec.load(model_path)
        model_name = spec.name
        try:
            model, placement = build_model(spec, device, place=config.place)
        except Skip as why:
            skip(str(why))
            continue
        results.setdefault("placement", {})[model_name] = placement
        on_device = placement == "device"
        results.setdefault("reference", {})[model_name] = ("full-gpu-grouped-mm" if on_device
                                                           else "the first specmd configuration")
        if not on_device:
            for name in ("full-gpu-grouped-mm", "full-gpu", "device-map-auto"):
                if name in config.baselines or name == "full-gpu-grouped-mm":
                    skip(f"{model_name}: {name} skipped: the model does not fit the device whole (built into "
                         "the host store); tokens are checked against the first specmd configuration")
        layers = find_moe_layers(model)
        layout = layers[0].layout
        expert_bytes, total_expert_bytes = layout.expert_bytes, layout.layer_bytes * len(layers)
        top_k = model.config.num_experts_per_tok
        native = copy_gbps(expert_bytes, device) if cuda else None
        results.setdefault("native_gbps", {})[model_name] = native
        if cuda:
            log(f"{model_name}: native pinned host->device copy of one expert ({expert_bytes / 2**20:.1f} MiB): "
                f"{native:.1f} GB/s")
        links = {}  # name -> target GB/s (None: the machine's own)
        for link in config.links:
            if link != NATIVE_LINK and not cuda:
                raise ValueError(f"link {link!r} is emulated with GPU sleeps: it needs CUDA")
            links[link] = None if link == NATIVE_LINK else LinkProfile.load(link).link_gbps
        workloads = _prompts(config, model.config.vocab_size, device)
        runs = config.num_runs // len(config.models) + (len(links) * len(workloads) if "on-demand" in config.baselines
                                                        else 0)
        bar = tqdm(total=runs, desc=f"{model_name} specmd runs", disable=not progress)
        reference: dict = {}
        with torch.inference_mode():
            # transformers' grouped_mm first: its tokens are what every other configuration must reproduce.
            for name, implementation in (("full-gpu-grouped-mm", "grouped_mm"), ("full-gpu", "eager")):
                if not on_device or name != "full-gpu-grouped-mm" and name not in config.baselines:
                    continue
                model.set_experts_implementation(implementation)
                for workload, ids in workloads.items():
                    timed = measure(model, ids, config.new_tokens, config.repeats)
                    reference.setdefault(workload, timed.tokens)
                    if name in config.baselines:
                        add(_row(model_name, "baseline", name, workload, config.new_tokens, timed,
                                 reference[workload], experts_implementation=implementation))
            model.set_experts_implementation("grouped_mm")

            def specmd_run(name: str, budget, link: str, preset: str | None, **offload_kwargs) -> None:
                if cuda and not on_device:  # a model that fit whole fits any pool: its experts left the device
                    budget_bytes = Budget.parse(budget).resolve(total_expert_bytes)
                    torch.cuda.empty_cache()  # memory torch caches but no tensor holds counts as free
                    free = torch.cuda.mem_get_info(device)[0]
                    if budget_bytes + FIT_HEADROOM_BYTES > free:
                        skip(f"{model_name}: {name} at {budget} skipped: {budget_bytes / 2**30:.1f} GiB of slots do "
                             f"not fit the device's {free / 2**30:.1f} GiB free")
                        bar.update(len(workloads))
                        return
                target_gbps, cycles, measured = links[link], 0, None
                if cuda:  # calibrated right before each run: the link's rate drifts over a long matrix
                    if target_gbps is None:
                        target_gbps = measured = copy_gbps(expert_bytes, device)
                    else:
                        cycles, measured, _ = calibrate_link(expert_bytes, target_gbps, device, cps)
                specmd.offload(model, budget, device=str(device), preset=preset, progress=progress, **offload_kwargs)
                handle = model.specmd
                if cycles:
                    handle._engine.cache.emulate_link(cycles)
                try:
                    for workload, ids in workloads.items():
                        # Kernels are warm from the baselines; a short warm-up keeps the matrix under 10 minutes.
                        timed = measure(model, ids, config.new_tokens, config.repeats, before_last=handle.reset_stats,
                                        warmup_tokens=SPECMD_WARMUP_TOKENS)
                        stats = handle.stats()  # syncs the device and waits for the watchdog: once per row
                        add(_row(model_name, "specmd" if preset else "baseline", name, workload, config.new_tokens,
                                 timed, reference.get(workload), budget=str(budget), budget_bytes=stats.budget_bytes,
                                 num_slots=handle.num_slots, link=link, link_gbps_target=target_gbps,
                                 link_gbps_measured=measured, stretch_cycles=cycles, **_stats_fields(stats)))
                        reference.setdefault(workload, timed.tokens)  # without full-GPU runs: the first one's
                        bar.update(1)
                finally:
                    handle.close()

            for budget in config.budgets:
                for link in links:
                    for preset in config.presets:
                        specmd_run(preset, budget, link, preset)
            if "on-demand" in config.baselines:
                for link in links:
                    specmd_run("on-demand", top_k * expert_bytes, link, None, eviction="fifo", prefetch="none")
            bar.close()
            if "device-map-auto" in config.baselines and on_device:
                if cuda:
                    _device_map_auto(model, config, device, workloads, reference, add, model_name,
                                     total_expert_bytes, log)
                else:
                    results["skipped"].append(f"{model_name}: device-map-auto needs CUDA")
        model = None  # (not del: the runs above close over it)
        gc.collect()  # the model's modules reference each other: free its device memory before the next one
        if cuda:
            torch.cuda.empty_cache()
    return results


def _device_map_auto(model, config: BenchConfig, device: torch.device, workloads: dict, reference: dict,
                     add, model_name: str, total_expert_bytes: int, log) -> None:
    """accelerate's placement with max_memory = non-expert weights + the expert budget, per budget."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    handle = getattr(model, "specmd", None)
    model.set_experts_implementation(handle.implementation if handle is not None else "grouped_mm")
    model.to("cpu")
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    non_expert = total_bytes - total_expert_bytes
    index = device.index if device.index is not None else torch.cuda.current_device()
    for budget in config.budgets:
        budget_bytes = Budget.parse(budget).resolve(total_expert_bytes)
        vram = non_expert + budget_bytes
        device_map = infer_auto_device_map(model, max_memory={index: vram, "cpu": host_memory_bytes()},
                                           no_split_module_classes=model._no_split_modules)
        on_gpu = sum(1 for d in device_map.values() if d == index)
        dispatch_model(model, device_map=device_map, main_device=index)
        try:
            for workload, ids in workloads.items():
                timed = measure(model, ids, DEVICE_MAP_NEW_TOKENS, 1, ttft_repeats=1, warmup_tokens=1)
                add(_row(model_name, "baseline", "device-map-auto", workload, DEVICE_MAP_NEW_TOKENS, timed,
                                 reference[workload][:, :ids.shape[1] + DEVICE_MAP_NEW_TOKENS], budget=str(budget),
                                 budget_bytes=budget_bytes, max_memory_bytes=vram, modules_on_gpu=on_gpu))
        finally:
            remove_hook_from_submodules(model)
            model.to("cpu")
        log(f"device_map=auto at {budget}: {on_gpu} of {len(device_map)} placed modules on the GPU")


def write_results(results: dict, out_dir: Path, stem: str, plots: bool = True) -> list[Path]:
    """``<stem>.json`` (everything), ``<stem>.md`` (the table) and, with ``plots``, the PNGs."""
    import json

    from .report import bench_markdown, bench_plots

    def plain(value):  # tuples of the config -> lists; anything else JSON cannot hold -> str
        return list(value) if isinstance(value, tuple) else str(value)

    files = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    files[0].write_text(json.dumps(results, indent=1, default=plain))
    files[1].write_text(bench_markdown(results))
    if plots:
        files += bench_plots(results, out_dir, stem)
    return files


def summary_table(results: dict) -> str:
    """A short fixed-width table of every row, printed last."""
    lines = [f"{'configuration':<28}{'link':<15}{'prompt':>7}{'TTFT ms':>9}{'TPOT ms':>9}{'hit %':>7}"
             f"{'stall ms':>9}  same"]
    for r in results["rows"]:
        name, same = bench_label(r), same_tokens_text(r)
        hit = f"{100 * r['hit_rate']:.1f}" if "hit_rate" in r else "-"
        stall = f"{r['stall_ms']:.0f}" if "stall_ms" in r else "-"
        lines.append(f"{name:<28}{r.get('link', '-'):<15}{r['prompt']:>7}{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.1f}"
                     f"{hit:>7}{stall:>9}  {same}")
    return "\n".join(lines)


def default_out_dir(device: torch.device) -> Path:
    """benchmarks/results/<date>-<gpu>/ under the repository."""
    name = torch.cuda.get_device_name(device).lower()
    gpu = next((w for w in name.replace("nvidia", "").split() if any(c.isdigit() for c in w)), "gpu")
    return Path(__file__).resolve().parent.parent / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{gpu}"
