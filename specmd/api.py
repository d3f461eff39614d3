"""Public entry points: ``offload`` a loaded model, load one with ``from_pretrained``, or build one with
random weights straight into place with ``from_config``."""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import check_checkpoint
from .config import DEFAULT_CPU_BUDGET, Budget, BudgetSpec, OffloadConfig, parse_dtype, preset_path
from .devices import device_memory, host_memory_available, move_except_experts, resolve_device
from .handle import OffloadHandle
from .load_report import LoadReport, StageClock, host_peak_bytes, host_resident_bytes
from .loader import checkpoint_dtype, read_checkpoint
from .runtime.adapters import ExpertLayout, MoELayer, find_moe_layers
from .runtime.cache import SlotCache
from .runtime.compute import KernelPlan
from .runtime.copier import SlotPool, make_copier
from .runtime.device_cache import DeviceCache
from .runtime.engines.binding import IMPLEMENTATION_NAME, Binding, experts_forward
from .runtime.engines.graph import GraphEngine
from .runtime.engines.threaded import ThreadedEngine
from .runtime.gather import MissGather
from .runtime.metrics import LayerStats
from .runtime.policies import make_policy
from .runtime.prefetch import Predictor, PrefetchConfig
from .runtime.store import HostStore

log = logging.getLogger(__name__)

Engine = ThreadedEngine | GraphEngine


def offload(model: nn.Module, expert_budget: BudgetSpec | None = None, eviction: str | None = None,
            device: str | None = None, *, prefetch: str | dict | PrefetchConfig | None = None,
            lookahead: int | None = None, preset: str | None = None, seed: int = 0, engine: str | None = None,
            progress: bool = False) -> nn.Module:
    """Offload a loaded Hugging Face MoE model's routed experts to host memory behind a device slot cache.

    Every routed expert moves into pinned host memory (plain memory for a CPU device); attention, norms,
    routers, embeddings and shared experts go to ``device``. At most ``expert_budget`` bytes of experts
    are ever on the device. Returns the same model; its ``generate`` works unchanged and its outputs
    equal the unpatched model's. ``model.specmd`` is the handle (stats, reset_stats, close).

    expert_budget: bytes (int), "600MB" / "0.6GB" / "1.5GiB", a fraction of all expert bytes (0.05 or
    "5%"), or "auto" (free device memory less a headroom, see ``config.AUTO_HEADROOM_BYTES``); default
    "auto". eviction: one of ``specmd.POLICIES`` (default "least-stale"). device: "cuda", "cpu" or None
    (CUDA when available). prefetch: "none" (default), "topk", "top-p", "threshold", or a
    ``PrefetchConfig``; lookahead: layers predicted ahead, 1..3. engine: "threaded" (default: main loop,
    prefetch loop, watchdog thread) or "graph" (the cache decided on the device; prefetch on a side stream). preset: a
    name in configs/policies/ (or a YAML path) supplying any of these that are not passed.
    """
    config = offload_config(expert_budget, eviction, device, prefetch, lookahead, preset, seed, engine)
    return _offload(model, config, progress=progress)


def offload_config(expert_budget: BudgetSpec | None = None, eviction: str | None = None, device: str | None = None,
                   prefetch: str | dict | PrefetchConfig | None = None, lookahead: int | None = None,
                   preset: str | None = None, seed: int = 0, engine: str | None = None) -> OffloadConfig:
    """``offload``'s arguments, a preset filling what they leave out, as a validated config (no work done: the
    command line checks its settings with it before loading anything). The budget is
    settled here, before any work: without one, "auto" on CUDA and ``DEFAULT_CPU_BUDGET`` on the CPU."""
    on_cuda = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    default = "auto" if on_cuda else DEFAULT_CPU_BUDGET
    if preset is not None:
        config = OffloadConfig.from_yaml(preset_path(preset), default_budget=default, expert_budget=expert_budget,
                                         eviction=eviction, device=device, prefetch=prefetch, lookahead=lookahead,
                                         seed=seed, engine=engine)
    else:
        config = OffloadConfig.create(default if expert_budget is None else expert_budget,
                                      eviction or "least-stale", device, seed, prefetch or "none", lookahead,
                                      engine or "threaded")
    if config.expert_budget.kind == "auto" and not on_cuda:
        raise ValueError(f"expert_budget='auto' measures free CUDA memory, and this model runs on the CPU; pass a "
                         f"size or a fraction instead, e.g. '{DEFAULT_CPU_BUDGET}' (the default on the CPU)")
    return config


def _offload(model: nn.Module, config: OffloadConfig, store: HostStore | None = None,
             progress: bool = False) -> nn.Module:
    """``offload`` with a validated config; ``store``: the experts already in host memory (``from_config``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"specmd offloads a loaded transformers model (a torch.nn.Module), not a "
                        f"{type(model).__name__}; to load a checkpoint folder use specmd.from_pretrained(path, ...)")
    handle = getattr(model, "specmd", None)
    if isinstance(handle, OffloadHandle) and not handle.closed:
        raise RuntimeError("this model is already offloaded by specmd; call model.specmd.close() before "
                           "offloading it again")
    target = resolve_device(config.device)
    layers = find_moe_layers(model)
    layout = layers[0].layout
    total_bytes = layout.layer_bytes * len(layers)
    if config.expert_budget.kind != "auto":
        _slots_for(config.expert_budget.resolve(total_bytes, expert_bytes=layout.expert_bytes), layout.expert_bytes,
                   config.expert_budget)
    top_k = getattr(model.config, "num_experts_per_tok", None) or getattr(layers[0].router, "top_k", 1)
    predictor = Predictor(config.prefetch, [layer.router for layer in layers], top_k)  # may refuse: before moving

    # What the experts modules dispatch on (use_experts_implementation keeps their config); since an earlier
    # offload it says "specmd", unless the user set another implementation after closing that one.
    implementation = getattr(layers[0].module.config, "_experts_implementation", None) or "eager"
    if implementation == IMPLEMENTATION_NAME and isinstance(handle, OffloadHandle):
        implementation = handle.implementation
    if store is not None:
        assert store.num_layers == len(layers)
    elif isinstance(handle, OffloadHandle) and handle.store.num_layers == len(layers):
        store = handle.store  # closed earlier: the experts are already in (pinned) host memory
    else:
        store = HostStore(target)  # pinned for a CUDA target only: a CPU model copies nothing to a GPU
        for layer in _store_bar(layers, progress):
            store.add_layer(layer)
    move_except_experts(model, [layer.module for layer in layers], target)

    free = total = None
    if config.expert_budget.kind == "auto":
        free, total = device_memory(target)
    budget_bytes = config.expert_budget.resolve(total_bytes, free, total, layout.expert_bytes)
    num_slots = min(_slots_for(budget_bytes, layout.expert_bytes, config.expert_budget),
                    layout.num_experts * len(layers))
    kernels = KernelPlan.mirroring(implementation, target.type)
    if config.engine == "graph":
        engine = _graph_engine(layers, store, config, budget_bytes, num_slots, kernels, target, predictor)
    else:
        engine = _threaded_engine(layers, store, config, budget_bytes, num_slots, predictor, kernels, target)
    _install(model, layers, engine)
    model.specmd = OffloadHandle(engine, config, store, top_k, implementation, model)
    if isinstance(engine, GraphEngine) and target.type == "cuda":
        model.specmd.set_static_cache = _capture_decode(model, engine, top_k)
    log.info("specmd: %d MoE layers, %d slots of %.1f MiB (budget %.1f MiB of %.1f MiB experts), %s engine, "
             "eviction %s, prefetch %s (lookahead %d)", len(layers), num_slots, layout.expert_bytes / 2**20,
             budget_bytes / 2**20, total_bytes / 2**20, config.engine, config.eviction, config.prefetch.policy,
             config.prefetch.lookahead)
    return model


def _store_bar(layers: list[MoELayer], progress: bool):
    """``layers``, with a progress bar while they move into the host store. A load of under half a second
    draws none (off a terminal every redraw lands on the same line)."""
    return tqdm(layers, desc="experts -> host store", unit="layer", disable=not progress, delay=0.5)


def _threaded_engine(layers: list[MoELayer], store: HostStore, config: OffloadConfig, budget_bytes: int,
                     num_slots: int, predictor: Predictor, kernels: KernelPlan,
                     device: torch.device) -> ThreadedEngine:
    """The threaded engine over a new slot pool: store -> copier -> cache -> engine."""
    layout: ExpertLayout = layers[0].layout
    pool = SlotPool(layout, num_slots, device)
    prefetch = config.prefetch
    threaded = prefetch.enabled and not prefetch.inline
    # Only the watchdog's copies are bounded: inline prefetches are issued in the main loop's own order.
    max_inflight = (prefetch.max_inflight or predictor.top_k) if threaded else None
    copier = make_copier(store, pool, device, max_inflight)
    layer_stats = [LayerStats() for _ in layers]
    cache = SlotCache(copier, num_slots, layout.expert_bytes, budget_bytes, make_policy(config.eviction, config.seed),
                      layer_stats)
    return ThreadedEngine(layers, cache, pool, layer_stats, predictor, kernels,
                          copies_from_model_thread=copier.asynchronous)


def _graph_engine(layers: list[MoELayer], store: HostStore, config: OffloadConfig, budget_bytes: int,
                  num_slots: int, kernels: KernelPlan, device: torch.device, predictor: Predictor) -> GraphEngine:
    """The graph engine over a new slot pool: store -> gather -> device cache -> engine."""
    layout: ExpertLayout = layers[0].layout
    if config.prefetch.enabled and num_slots >= len(layers) * layout.num_experts:
        # every expert stays resident: a prefetch could copy nothing, and would still cost its router products
        # and cache calls in every decode step
        log.info("specmd: the pool holds all %d experts: prefetch=%r has nothing to copy and is off",
                 num_slots, config.prefetch.policy)
        predictor = None
    pool = SlotPool(layout, num_slots, device)
    cache = DeviceCache(len(layers), layout.num_experts, num_slots, config.eviction, device,
                        MissGather(store, pool, device, config.prefetch.gather_programs))
    return GraphEngine(layers, cache, pool, kernels, budget_bytes, predictor)


def _install(model: nn.Module, layers: list[MoELayer], engine: Engine) -> None:
    """Route every experts module of ``model`` through ``engine`` (transformers' ExpertsInterface)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, experts_forward)
    for layer in layers:
        layer.module._specmd_binding = Binding(engine, layer.index)
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    _track_decode(model, engine)


def _track_decode(model: nn.Module, engine: Engine) -> None:
    """Tell the engine when ``generate`` decodes: transformers switches grouped_mm to batched_mm there
    (``_optimize_model_for_decode``), and the engine must switch kernels with it to stay bit-identical."""
    original = getattr(type(model), "_optimize_model_for_decode", None)
    if original is None:  # a transformers without the switch: prefill kernels throughout, as it does
        return

    @contextlib.contextmanager
    def decoding(*args, **kwargs):
        with original(model, *args, **kwargs):
            engine.decoding = True
            try:
                yield
            finally:
                engine.decoding = False

    model._optimize_model_for_decode = decoding  # on the instance; close() removes it


def _capture_decode(model: nn.Module, engine: GraphEngine, top_k: int) -> bool:
    """Make ``generate`` run each decode step of the graph engine as one CUDA graph: with a static KV cache,
    transformers compiles the decode step (torch.compile with its CompileConfig: mode "reduce-overhead",
    which captures CUDA graphs) and the engine's device path lets the whole step be captured. Set only where
    the user chose no cache; returns whether it was set (``close`` unsets it)."""
    need = min(engine.cache.num_experts, top_k)  # one token's routed experts, all in the pool at once
    if engine.cache.num_slots < need:
        log.warning("specmd: %d slots hold fewer than the %d experts one token routes to: decode steps run "
                    "uncaptured and chunked; a budget of at least %d experts lets them run as CUDA graphs",
                    engine.cache.num_slots, need, need)
        return False
    config = getattr(model, "generation_config", None)
    if config is None or config.cache_implementation is not None:
        return False
    config.cache_implementation = "static"
    return True


def _slots_for(budget_bytes: int, expert_bytes: int, spec: Budget) -> int:
    slots = budget_bytes // expert_bytes
    if slots < 1:
        raise ValueError(f"expert_budget ({spec} = {budget_bytes} bytes) is below one expert "
                         f"({expert_bytes} bytes); raise it to at least {expert_bytes} bytes")
    return slots


def from_pretrained(path: str | Path, expert_budget: BudgetSpec | None = None, eviction: str | None = None,
                    device: str | None = None, *, dtype: torch.dtype | str | None = None,
                    prefetch: str | dict | PrefetchConfig | None = None, lookahead: int | None = None,
                    preset: str | None = None, seed: int = 0, engine: str | None = None, progress: bool = True,
                    attn_implementation: str | None = None) -> nn.Module:
    """Load a local checkpoint and offload it (arguments as ``offload``); experts never all reach the device.

    The model is made on the meta device; each MoE layer's experts get a host buffer and every other weight
    its place on the device; then the safetensors files are read tensor by tensor, on several threads,
    straight into those places (``loader.py``): the experts are never twice in host memory. Each buffer is
    pinned in place once its experts are in, while later layers are read. ``dtype``: as transformers' "auto"
    when None (the config's, else the checkpoint's). ``model.specmd.load_report``: the wall time by stage,
    bytes read and host memory of the load (``load_report.LoadReport``). Nothing is fetched from a hub.
    """
    from transformers import AutoConfig, GenerationConfig

    clock = StageClock()
    host_before = host_resident_bytes()
    settings = offload_config(expert_budget, eviction, device, prefetch, lookahead, preset, seed, engine)
    target = resolve_device(settings.device)
    path = Path(path)
    check_checkpoint(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    config._name_or_path = str(path)
    dtype = parse_dtype(dtype) or _config_dtype(config) or checkpoint_dtype(path)
    store = HostStore(target)  # pinned for a CUDA target only
    model, layers = _skeleton(config, dtype, target, store, clock)
    try:
        read = read_checkpoint(model, layers, store, path, progress)
        clock.lap("read")
    finally:  # also after a failed read: no pinning thread outlives the load
        store.wait_pinned()
    clock.lap("pin")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model = _offload(model.eval(), settings, store=store, progress=progress)
    clock.lap("engine")
    report = LoadReport(seconds=clock.seconds, bytes_read=read.bytes_read, host_peak_bytes=host_peak_bytes(),
                        host_before_bytes=host_before, stages=tuple(clock.stages.items()), read_threads=read.threads)
    model.specmd.load_report = report
    log.info("specmd: %s", report.summary())
    return model


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def _skeleton(config, dtype: torch.dtype, target: torch.device, store: HostStore,
              clock: StageClock | None = None) -> tuple[nn.Module, list[MoELayer]]:
    """A model of ``config`` made on the meta device, then placed: each MoE layer's experts become views of a
    new host buffer of ``store`` (unwritten, not pinned yet), every other weight and buffer is allocated on
    ``target`` and initialised by transformers (so buffers such as rotary frequencies are right). ``clock``
    times the three stages (skeleton, allocate, place)."""
    clock = clock or StageClock()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # on a copy of the config: offloading sets its experts implementation
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    layers = find_moe_layers(model)
    clock.lap("skeleton")
    need = sum(layer.layout.num_experts * layer.layout.block_numel for layer in layers) * dtype.itemsize
    available = host_memory_available()
    if available is not None and need > available:  # refused now, not when the allocation fails half way
        raise MemoryError(f"the experts need {need / 2**30:.1f} GiB of host memory and {available / 2**30:.1f} GiB "
                          "are available: free memory, use a machine with more RAM, or load a smaller dtype "
                          "(dtype='bfloat16')")
    for layer in layers:
        store.add_layer(layer, copy=False)
        # transformers' initialisation would draw them, on the CPU: minutes for a large model
        layer.module._is_hf_initialized = True
    clock.lap("allocate")
    experts = {id(layer.module) for layer in layers}
    with torch.no_grad():
        for module in model.modules():
            if id(module) not in experts:
                module.to_empty(device=target, recurse=False)
        model.initialize_weights()  # every other weight and buffer, in place on the device
        model.tie_weights()  # to_empty gave tied modules separate tensors
    clock.lap("place")
    return model, layers


def from_config(config, expert_budget: BudgetSpec | None = None, eviction: str | None = None,
                device: str | None = None, *, dtype: torch.dtype = torch.bfloat16,
                prefetch: str | dict | PrefetchConfig | None = None, lookahead: int | None = None,
                preset: str | None = None, seed: int = 0, engine: str | None = None,
                progress: bool = False) -> nn.Module:
    """Build a model of a transformers ``config`` with random weights straight where they belong, and
    offload it (arguments as ``offload``): the module tree is made on the meta device, each MoE layer's
    experts go to a (pinned) host buffer filled as transformers would (N(0, initializer_range), zero
    biases; drawn on ``device``), and non-expert weights are allocated on ``device`` and initialised by
    transformers, all seeded by ``seed``. No copy of the whole model exists anywhere, so models larger
    than the device run (benchmarks of real shapes; the outputs are random text)."""

    settings = offload_config(expert_budget, eviction, device, prefetch, lookahead, preset, seed, engine)
    target = resolve_device(settings.device)
    torch.manual_seed(seed)
    store = HostStore(target)  # pinned for a CUDA target only
    model, layers = _skeleton(config, dtype, target, store)
    for layer in layers:  # pinned before the fill: copies from the device then run at link speed
        store.submit_pin(layer.index)
    store.wait_pinned()
    std = getattr(model.config, "initializer_range", 0.02)
    for layer in _store_bar(layers, progress):
        store.fill_random(layer, std, target)
    return _offload(model.eval(), settings, store=store, progress=progress)
