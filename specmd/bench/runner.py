"""The GPU runner of ``specmd bench``: baselines and specmd presets on the same model, in one process.

Per model of the config (random weights, built on the GPU when the whole model fits there; else built
straight into place by ``specmd.from_config``, non-expert weights on the GPU and experts in the host
store, when those fit; else skipped with a message): the full-GPU baselines when the model fits
(transformers' eager experts and its default grouped_mm; the latter's tokens are the reference, else the
first specmd configuration's are; on CUDA with a graph preset, or when asked, also grouped_mm with transformers'
compiled decode step, the reference of rows whose decode steps are CUDA graphs: ``compiled.py``), then every
budget x link x preset x prompt x batch through specmd,
then on-demand loading (one layer's top-k slots, nothing reused) per link, and last
``device_map="auto"`` with ``max_memory`` equal to specmd's VRAM (non-expert weights + expert budget),
which rebuilds the model's placement and so ends its use.

Timing (``timing.py``): a warm-up (full length for the full-GPU baselines, a few tokens for specmd runs,
whose kernels are warm by then), TTFT as the median of one-token generates, TPOT as
(median full generate - TTFT) / (new tokens - 1); the device is synchronized around every timed call.
Counters (hits, stall, bytes) cover the last full generate. A slower link than the machine's is emulated
by stretching each copy with a GPU sleep (``linkemu``), calibrated on the machine; the copy rate that
results is measured and recorded next to each result.
"""
from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Budget, OffloadConfig, preset_path
from ..runtime.adapters import find_moe_layers
from ..study.costmodel import LinkProfile, ModelSpec
from ..study.trace import RoutingTrace, load_trace
from .baselines import device_map_auto
from .compiled import captures_decode, decode_mode, default_decode_mode, fresh_compile
from .config import NATIVE_LINK, RANDOM_ROUTING, REPLAY, BenchConfig
from .models import FIT_HEADROOM_BYTES, Skip, build_model
from .results import Results, distinct_outputs, first_differing_position, row, stats_fields, unmatched_outputs
from .timing import Timed, calibrate_link, copy_gbps, measure, replay_seconds, sleep_cycles_per_second

SPECMD_WARMUP_TOKENS = 8
FULL_GPU = (("full-gpu-grouped-mm", "grouped_mm"), ("full-gpu", "eager"))  # (baseline, experts implementation)
FULL_GPU_COMPILED = "full-gpu-compiled"  # grouped_mm with transformers' compiled decode step (static cache)
ON_DEMAND = {"eviction": "fifo", "prefetch": "none"}  # the on-demand baseline: one layer's top-k slots, nothing kept


def _prompts(config: BenchConfig, vocab: int, device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {(n, b): torch.randint(10, vocab - 1, (b, n), generator=gen).to(device)
            for n in config.prompts for b in config.batch}


def _agreement(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """How far ``tokens`` follow ``reference``: its length when equal, else the first differing position."""
    if torch.equal(tokens, reference):
        return tokens.shape[-1]
    position = first_differing_position(tokens, reference)
    return -1 if position is None else position


class ModelBench:
    """Every run of the matrix on one model."""

    def __init__(self, spec: ModelSpec, model, placement: str, config: BenchConfig, device: torch.device,
                 results: Results, cycles_per_second: float | None, progress: bool,
                 trace: RoutingTrace | None = None, replay_decode: int | None = None) -> None:
        self.name, self.model, self.config, self.device = spec.name, model, config, device
        self.results, self.cps, self.progress = results, cycles_per_second, progress
        self.cuda = device.type == "cuda"
        self.on_device = placement == "device"
        layers = find_moe_layers(model)
        self.expert_bytes = layers[0].layout.expert_bytes
        self.total_expert_bytes = layers[0].layout.layer_bytes * len(layers)
        self.workloads = _prompts(config, model.config.vocab_size, device)
        self.trace = trace  # None: the model's own routers; else every specmd run replays it (``replay_run``)
        self.replay_decode = replay_decode  # the trace's decode passes cut to this many per prompt (None: whole)
        if trace is not None:  # the full-GPU baselines run the trace's prompt length too, the rows' reference
            self.replay_workload = (round(sum(t for t, _ in trace.prompts) / len(trace.prompts)), 1)
            if self.replay_workload not in self.workloads:
                gen = torch.Generator().manual_seed(1)
                self.workloads[self.replay_workload] = torch.randint(10, model.config.vocab_size - 1,
                                                                     (1, self.replay_workload[0]), generator=gen).to(device)
        self.routing = f"{REPLAY} {Path(trace.source).name}" if trace is not None else RANDOM_ROUTING
        self.reference: dict = {}  # workload -> the tokens every other configuration must reproduce
        self.compiled_reference: dict = {}  # workload -> those of rows whose decode steps are CUDA graphs
        self.compiled_outputs: dict = {}  # workload -> the compiled full-GPU model's different outputs
        self.graph_presets = any(OffloadConfig.from_yaml(preset_path(p)).engine == "graph" for p in config.presets)
        # One static cache length for every compiled generate, full GPU and graph rows alike: transformers
        # otherwise sizes each by the longest call so far, so a token check would attend over another cache.
        longest = [n + config.new_tokens for n, _ in self.workloads]
        if trace is not None:
            longest += [tokens + decode + 1 for tokens, decode in trace.prompts]
        self.static_cache_len = max(longest)
        self.links = {}  # name -> target GB/s (None: the machine's own)
        for link in config.links:
            if link != NATIVE_LINK and not self.cuda:
                raise ValueError(f"link {link!r} is emulated with GPU sleeps: it needs CUDA")
            self.links[link] = None if link == NATIVE_LINK else LinkProfile.load(link).link_gbps

    def full_gpu(self) -> None:
        """transformers' grouped_mm first: its tokens are what every other configuration must reproduce."""
        for name, implementation in FULL_GPU:
            if name != "full-gpu-grouped-mm" and name not in self.config.baselines:
                continue
            self.model.set_experts_implementation(implementation)
            for workload, ids in self.workloads.items():
                timed = measure(self.model, ids, self.config.new_tokens, self.config.repeats)
                self.reference.setdefault(workload, timed.tokens)
                if name in self.config.baselines:
                    self.results.add(row(self.name, "baseline", name, workload, self.config.new_tokens, timed,
                                         self.reference[workload], experts_implementation=implementation,
                                         routing=RANDOM_ROUTING))
        self.model.set_experts_implementation("grouped_mm")
        if self.cuda and (self.graph_presets or FULL_GPU_COMPILED in self.config.baselines):
            self.compiled_full_gpu()
        elif FULL_GPU_COMPILED in self.config.baselines:
            self.results.skip(f"{self.name}: {FULL_GPU_COMPILED} skipped: transformers compiles the decode step "
                              "(CUDA graphs) on CUDA only")

    def compiled_full_gpu(self) -> None:
        """The reference of the rows whose decode steps run as CUDA graphs (the graph engine on CUDA): the same
        model with transformers' compiled decode step, whose bf16 rounding differs from the eager step's; a
        baseline row of its own when the config names it, its tokens compared with the uncompiled model's."""
        decode_mode(self.model, compiled=True, cache_len=self.static_cache_len)
        try:
            for workload, ids in self.workloads.items():
                fresh_compile(self.model)  # each workload's own static graph, not a recompiled dynamic one
                timed = measure(self.model, ids, self.config.new_tokens, self.config.repeats)
                self.compiled_reference[workload] = timed.tokens
                self.compiled_outputs[workload] = outputs = distinct_outputs(timed.outputs)
                if len(outputs) > 1:
                    self.results.note(f"{self.name}: {FULL_GPU_COMPILED}, prompt {workload[0]} x {workload[1]}: its "
                                      f"{len(timed.outputs)} generates gave {len(outputs)} different outputs (its "
                                      "compiled decode step is not reproducible run to run here); rows whose decode "
                                      "steps are CUDA graphs are checked against each of them")
                if FULL_GPU_COMPILED in self.config.baselines:
                    self.results.add(row(self.name, "baseline", FULL_GPU_COMPILED, workload, self.config.new_tokens,
                                         timed, self.reference[workload], experts_implementation="grouped_mm",
                                         routing=RANDOM_ROUTING, token_check="against the uncompiled full-GPU model",
                                         distinct_outputs=len(outputs)))
        except Exception as err:  # e.g. inductor failing on an op: the rows keep the uncompiled check, labelled
            self.compiled_reference.clear()
            self.compiled_outputs.clear()
            self.results.skip(f"{self.name}: {FULL_GPU_COMPILED} failed ({type(err).__name__}: {err}); rows whose "
                              "decode steps are CUDA graphs are checked against the uncompiled model")
        finally:
            default_decode_mode(self.model)
            fresh_compile(self.model)  # the offloaded model compiles afresh, within dynamo's recompile limit

    def _reference(self, workload: tuple[int, int],
                   outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor, str]:
        """(the tokens a row's output must equal, that output, what the check is), for a row whose full-length
        generates gave ``outputs`` (the last one last): the compiled full-GPU model's tokens when the row's decode
        steps run as CUDA graphs and that model was measured, else the uncompiled reference; the row's last
        output. Where the compiled model's own generates differed (its compiled step is not reproducible run to
        run in bf16), every output of the row must equal one of them: the first that equals none is checked,
        against the one it follows longest; else the last, against the one it equals."""
        last = outputs[-1]
        if not captures_decode(self.model):
            return self.reference.get(workload), last, "uncompiled"
        if workload not in self.compiled_reference:
            return (self.reference.get(workload), last,
                    "compiled, against the uncompiled reference (no compiled full-GPU run)")
        check = "compiled, against the compiled full-GPU model"
        references = self.compiled_outputs.get(workload, [])
        if len(references) <= 1:
            return self.compiled_reference[workload], last, check
        mine = distinct_outputs(outputs)
        unmatched = unmatched_outputs(mine, references)
        check += (f" (whose generates gave {len(references)} different outputs; this row's {len(mine)} "
                  f"{'each equal' if not unmatched else 'do not all equal'} one of them)")
        tokens = unmatched[0] if unmatched else last
        return max(references, key=lambda ref: _agreement(tokens, ref)), tokens, check

    def _keep_first(self, workload: tuple[int, int], tokens: torch.Tensor) -> None:
        """Without full-GPU runs the first specmd row of each mode is the reference of that mode's rows."""
        (self.compiled_reference if captures_decode(self.model) else self.reference).setdefault(workload, tokens)

    def _fits(self, name: str, budget) -> bool:
        if not self.cuda or self.on_device:  # a model that fit whole fits any pool: its experts left the device
            return True
        budget_bytes = Budget.parse(budget).resolve(self.total_expert_bytes, expert_bytes=self.expert_bytes)
        torch.cuda.empty_cache()  # memory torch caches but no tensor holds counts as free
        free = torch.cuda.mem_get_info(self.device)[0]
        if budget_bytes + FIT_HEADROOM_BYTES <= free:
            return True
        self.results.skip(f"{self.name}: {name} at {budget} skipped: {budget_bytes / 2**30:.1f} GiB of slots do "
                          f"not fit the device's {free / 2**30:.1f} GiB free")
        return False

    def _link(self, link: str) -> tuple[float | None, int, float | None]:
        """(target GB/s, stretch cycles, measured GB/s), calibrated right before each run: the link's rate
        drifts over a long matrix."""
        target_gbps, cycles, measured = self.links[link], 0, None
        if self.cuda:
            if target_gbps is None:
                target_gbps = measured = copy_gbps(self.expert_bytes, self.device)
            else:
                cycles, measured, _ = calibrate_link(self.expert_bytes, target_gbps, self.device, self.cps)
        return target_gbps, cycles, measured

    def specmd_run(self, name: str, budget, link: str, preset: str | None, bar, **offload_kwargs) -> None:
        """Every workload through specmd at ``budget`` on ``link`` (a preset, or ``offload_kwargs``)."""
        import specmd

        if not self._fits(name, budget):
            bar.update(len(self.workloads))
            return
        target_gbps, cycles, measured = self._link(link)
        if self.cuda:
            fresh_compile(self.model)  # a graph engine's offload compiles its own step
        specmd.offload(self.model, budget, device=str(self.device), preset=preset, progress=self.progress,
                       **offload_kwargs)
        handle = self.model.specmd
        if captures_decode(self.model):  # the engine chose the static cache: the compiled reference's length
            self.model.generation_config.max_cache_len = self.static_cache_len
        if cycles:
            handle.emulate_link(cycles)
        link_fields = dict(budget=str(budget), link=link, link_gbps_target=target_gbps, link_gbps_measured=measured,
                           stretch_cycles=cycles)
        try:
            if self.trace is not None:
                self.replay_run(name, preset, link_fields)
                bar.update(len(self.workloads))
                return
            for workload, ids in self.workloads.items():
                # Kernels are warm from the baselines; a short warm-up keeps the matrix under 10 minutes.
                timed = measure(self.model, ids, self.config.new_tokens, self.config.repeats,
                                before_last=handle.reset_stats, warmup_tokens=SPECMD_WARMUP_TOKENS)
                stats = handle.stats()  # syncs the device and waits for the watchdog: once per row
                reference, tokens, check = self._reference(workload, timed.outputs or [timed.tokens])
                self.results.add(row(self.name, "specmd" if preset else "baseline", name, workload,
                                     self.config.new_tokens, replace(timed, tokens=tokens), reference,
                                     token_check=check,
                                     budget_bytes=stats.budget_bytes, num_slots=handle.num_slots,
                                     routing=RANDOM_ROUTING, **link_fields, **stats_fields(stats)))
                self._keep_first(workload, timed.tokens)  # without full-GPU runs: the first one's
                bar.update(1)
        finally:
            handle.close()
            self.model.generation_config.max_cache_len = None

    def replay_run(self, name: str, preset: str | None, link_fields: dict) -> None:
        """One configuration on the trace's routing: a whole replay to warm up (kernels, compiled steps), then
        a timed one, the same replay rewound, whose counters the row gets, then its prefills alone (each prompt
        with one new token): TTFT = the prefills' mean, TPOT = (whole - prefills) / decode steps. Then the tokens
        under the model's own routers, on the first workload, against the reference of the row's mode
        (``_reference``; outputs mean nothing under replay)."""
        handle, trace = self.model.specmd, self.trace
        try:
            handle.replay_routing(trace)
        except ValueError as err:  # e.g. a top-p preset where the trace ranks its candidates without scores
            self.results.skip(f"{self.name}: {name} at {link_fields['budget']} under {self.routing} skipped: {err}")
            return
        vocab = self.model.config.vocab_size
        replay_seconds(self.model, trace.prompts, vocab, self.device)
        handle.rewind_replay()  # the same replay: what the warm-up captured and compiled stays
        handle.reset_stats()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        whole = replay_seconds(self.model, trace.prompts, vocab, self.device)
        stats = handle.stats()
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        handle.replay_routing(trace.prefills())
        prefills = replay_seconds(self.model, trace.prompts, vocab, self.device, prefill_only=True)
        handle.replay_routing(None)
        workload, ids = next(iter(self.workloads.items()))  # the config's first prompt
        tokens = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.config.new_tokens,
                                     min_new_tokens=self.config.new_tokens, do_sample=False)
        reference, tokens, check = self._reference(workload, [tokens])
        decode_steps = sum(decode for _, decode in trace.prompts)
        timed = Timed(prefills / len(trace.prompts) * 1e3, (whole - prefills) / max(1, decode_steps) * 1e3, tokens,
                      peak)
        self.results.add(row(self.name, "specmd" if preset else "baseline", name, self.replay_workload,
                             decode_steps // len(trace.prompts) + 1, timed, reference,
                             budget_bytes=stats.budget_bytes, num_slots=handle.num_slots, routing=self.routing,
                             replay_decode=self.replay_decode,
                             token_check=f"own routers, prompt {workload[0]} x {workload[1]}, {check}", **link_fields,
                             **stats_fields(stats)))
        self._keep_first(workload, tokens)

    def run_all(self) -> None:
        """Baselines, the specmd matrix, on-demand, then device_map="auto" (which ends the model's use)."""
        from tqdm.auto import tqdm

        config = self.config
        runs = config.num_runs // len(config.models)
        if "on-demand" in config.baselines:
            runs += len(self.links) * len(self.workloads)
        bar = tqdm(total=runs, desc=f"{self.name} specmd runs", disable=not self.progress)
        with torch.inference_mode():
            if self.on_device:
                self.full_gpu()
            for budget in config.budgets:
                for link in self.links:
                    for preset in config.presets:
                        self.specmd_run(preset, budget, link, preset, bar)
            if "on-demand" in config.baselines:
                top_k = self.model.config.num_experts_per_tok
                for link in self.links:
                    self.specmd_run("on-demand", top_k * self.expert_bytes, link, None, bar, **ON_DEMAND)
            bar.close()
            if "device-map-auto" in config.baselines and self.on_device:
                if self.cuda:
                    device_map_auto(self)
                else:
                    self.results.doc["skipped"].append(f"{self.name}: device-map-auto needs CUDA")


def run(config: BenchConfig, device: torch.device, progress: bool = True, log=print, on_row=None) -> dict:
    """Run the matrix on ``device``; returns {machine, config, rows, skipped, ...}. ``on_row(results)`` is
    called after every result (to write files as it goes). On a CPU (tests only: ``specmd bench`` refuses)
    links are not measured and only the native link, specmd and on-demand runs are possible."""
    results = Results(config, device, log, on_row)
    cps = sleep_cycles_per_second(device) if device.type == "cuda" else None
    results.doc["sleep_cycles_per_second"] = cps
    for model_path in config.models:
        spec = ModelSpec.load(model_path)
        try:
            model, placement = build_model(spec, device, place=config.place)
        except Skip as why:
            results.skip(str(why))
            continue
        results.per_model("placement", spec.name, placement)
        results.per_model("reference", spec.name, "full-gpu-grouped-mm (compiled decode step: full-gpu-compiled)"
                          if placement == "device" else "the first specmd configuration of each mode")
        if placement != "device":
            for name in ("full-gpu-grouped-mm", "full-gpu", "device-map-auto"):
                if name in config.baselines or name == "full-gpu-grouped-mm":
                    results.skip(f"{spec.name}: {name} skipped: the model does not fit the device whole (built "
                                 "into the host store); tokens are checked against the first specmd configuration")
        trace_path = config.trace_path(model_path)
        trace = load_trace(trace_path) if trace_path else None
        replay_decode = config.replay_decode_of(model_path) if trace is not None else None
        if replay_decode is not None:
            trace = trace.head(replay_decode)
        bench = ModelBench(spec, model, placement, config, device, results, cps, progress, trace, replay_decode)
        results.per_model("routing", spec.name, bench.routing)
        native = copy_gbps(bench.expert_bytes, device) if bench.cuda else None
        results.per_model("native_gbps", spec.name, native)
        if bench.cuda:
            log(f"{spec.name}: native pinned host->device copy of one expert ({bench.expert_bytes / 2**20:.1f} MiB): "
                f"{native:.1f} GB/s")
        bench.run_all()
        model = bench = None
        gc.collect()  # the model's modules reference each other: free its device memory before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results.doc
