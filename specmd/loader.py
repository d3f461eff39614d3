"""Reading a checkpoint's safetensors files straight into an offloaded model: each expert tensor from the
file into its rows of the host store, every other tensor into its parameter on the device, by plain reads
of the file (no memory map: a mapped file's touched pages would count as the process's memory), on
``READ_THREADS`` threads. The experts never exist twice in host memory (transformers' own load makes the
whole model first; copying its experts into the store after would hold them twice).

Everything is checked before the first byte is read (names, dtypes, shapes, sizes, completeness); then the
tensors are read in pieces of about ``CHUNK_BYTES`` (consecutive tensors of one file) by a thread pool, each
piece through its own file handle. A MoE layer's store buffer is submitted for pinning as soon as its
experts are all in (``HostStore.submit_pin``), so the pinning overlaps the reads of the later layers.

Names: a checkpoint holds either the model's own fused tensors (``...experts.gate_up_proj``, what
transformers 5 keeps in memory) or the per-expert tensors of published checkpoints, under the family's
names (``runtime/adapters.CHECKPOINT_NAMES``, the part of transformers' conversion mapping the supported
families need: a new family's names are one entry there).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import shard_files
from .runtime.adapters import CHECKPOINT_NAMES, CheckpointNames, MoELayer
from .runtime.store import HostStore, layout_views

log = logging.getLogger(__name__)

# safetensors dtype -> torch dtype of what specmd reads; the others (quantized formats) are refused
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
# Readers: the reads release the GIL; several requests in flight keep an NVMe drive busy cold, and the page
# cache is copied on several cores warm. 8 is a first guess, not a measured optimum: benchmarks/load_h100.py
# prints a plain parallel read of the same count beside the load.
# The CPUs this process may run on (taskset, a container's cpuset), not the machine's. read_checkpoint reads
# this at each call, so a test or benchmark that changes it is obeyed.
READ_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
CHUNK_BYTES = 64 * 2**20  # one task of a reader: small enough to balance 8 readers over a 14 GB checkpoint
STAGING_BYTES = 64 * 2**20  # at most this much host memory per reader for tensors that cannot be read in place


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: its dtype name, shape and byte range in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _damaged(shard: Path, what: str) -> ValueError:
    return ValueError(f"{shard}: the header is damaged ({what}); copy the checkpoint again")


def _entries(shard: Path) -> list[_Entry]:
    """The tensors of a safetensors file, from its header (8 bytes of length, then JSON), in file order.
    A header that cannot be parsed is refused with the file's name."""
    with open(shard, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or length > size - 8:  # before reading: a damaged length would allocate up to 16 EiB
            raise _damaged(shard, f"it gives a header of {length} bytes in a file of {size}")
        raw = file.read(length)
    base = 8 + length
    try:
        header = json.loads(raw.decode("utf-8"))  # the format says UTF-8; json.loads(bytes) would guess
        header.pop("__metadata__", None)
        entries = [_Entry(key, str(info["dtype"]), tuple(int(n) for n in info["shape"]),
                          base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
                   for key, info in header.items()]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:  # JSON, UTF-8, missing fields
        raise _damaged(shard, f"{type(err).__name__}: {err}") from err
    for entry in entries:
        dtype = FLOAT_DTYPES.get(entry.dtype)
        if dtype is not None and entry.end - entry.start != torch.Size(entry.shape).numel() * dtype.itemsize:
            raise ValueError(f"{shard}: the header gives {entry.key} {entry.end - entry.start} bytes for shape "
                             f"{list(entry.shape)} of {entry.dtype}; the file is damaged: copy the checkpoint again")
    return sorted(entries, key=lambda e: e.start)


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor (transformers' "auto" when the config names none)."""
    for shard in shard_files(path):
        for entry in _entries(shard):
            if entry.dtype in FLOAT_DTYPES:
                return FLOAT_DTYPES[entry.dtype]
    return torch.float32


def _read_exactly(file, offset: int, target: torch.Tensor, shard: Path) -> None:
    """Fill the contiguous CPU ``target`` with the file's bytes from ``offset`` (one read, straight into it)."""
    buffer = target.view(-1).view(torch.uint8).numpy()
    file.seek(offset)
    done = 0
    while done < buffer.nbytes:
        count = file.readinto(buffer[done:])
        if not count:
            raise ValueError(f"{shard}: ends inside a tensor; the file is truncated: copy the checkpoint again")
        done += count


def _read_tensor(file, entry: _Entry, target: torch.Tensor, shard: Path) -> None:
    """Copy ``entry`` into ``target`` (its shape; any device and dtype): read straight into the target where
    it is a CPU tensor of the file's dtype, contiguous per row (the store's experts), else through a staging
    tensor of at most ``STAGING_BYTES``, a run of rows at a time (the file holds the rows in order)."""
    dtype = FLOAT_DTYPES[entry.dtype]
    if target.device.type == "cpu" and target.dtype == dtype:
        rows = [target] if target.is_contiguous() else list(target)  # a fused [E, ...] view: contiguous per expert
        if all(row.is_contiguous() for row in rows):
            offset = entry.start
            for row in rows:
                _read_exactly(file, offset, row, shard)
                offset += row.numel() * row.element_size()
            return
    target = target.unsqueeze(0) if target.dim() == 0 else target  # [rows, ...]
    row_bytes = (entry.end - entry.start) // max(target.shape[0], 1)
    step = max(1, STAGING_BYTES // max(row_bytes, 1))
    staging = torch.empty((min(step, target.shape[0]), *target.shape[1:]), dtype=dtype)
    for first in range(0, target.shape[0], step):
        part = staging[:min(step, target.shape[0] - first)]
        _read_exactly(file, entry.start + first * row_bytes, part, shard)
        target[first:first + part.shape[0]].copy_(part)


class _Places:
    """Where each tensor of the checkpoint goes, and what has been written."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], store: HostStore, names: CheckpointNames) -> None:
        self.layers = layers
        self.names = names
        self.renames = [(re.compile(pattern), replacement) for pattern, replacement in names.renames]
        module_names = {id(module): name for name, module in model.named_modules()}
        self.blocks = {module_names[id(layer.module)]: layer.index for layer in layers}  # experts module -> layer
        self.views = [layout_views(store.layer(layer.index), layer.layout) for layer in layers]
        self.fused = {f"{block}.{name}": (index, name) for block, index in self.blocks.items()
                      for name in layers[index].layout.names}
        # every other parameter and persistent buffer, under each of its names (tied ones share a tensor). Not
        # model.state_dict(): its hook makes the strided expert views contiguous, a second copy of the experts.
        self.params = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            tensors = list(module._parameters.items()) + [(name, t) for name, t in module._buffers.items()
                                                          if name not in module._non_persistent_buffers_set]
            for name, tensor in tensors:
                full = f"{prefix}.{name}" if prefix else name
                if tensor is not None and full not in self.fused:  # the experts are the store's
                    self.params[full] = tensor
        self.loaded: set[str] = set()
        self.expert_elements: dict[tuple[int, str], int] = {}

    def model_name(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = pattern.sub(replacement, key)
        return key

    def target(self, key: str) -> tuple[torch.Tensor | None, tuple | None]:
        """(the tensor ``key`` is copied into, the expert part it fills) or (None, None) when nothing takes it."""
        name = self.model_name(key)
        if name in self.params:
            self.loaded.add(name)
            return self.params[name].data, None
        if name in self.fused:
            layer, fused = self.fused[name]
            return self.views[layer][fused], (layer, fused)
        match = _PER_EXPERT.match(name)
        if match is None or match["block"] not in self.blocks:
            return None, None
        layer = self.blocks[match["block"]]
        expert, proj = int(match["expert"]), match["proj"]
        layout = self.layers[layer].layout
        if expert >= layout.num_experts:
            raise ValueError(f"{key}: expert {expert}, but the config gives {layout.num_experts} experts per layer: "
                             "the checkpoint does not match its config.json")
        if proj not in (self.names.gate, self.names.up, self.names.down):
            return None, None
        if layout.is_transposed:  # before any part: a square down projection would load transposed
            raise ValueError(f"{key}: per-expert tensors of a transposed expert layout are not supported; save the "
                             "checkpoint with transformers 5 (fused experts)")
        if proj == self.names.down:
            return self.views[layer]["down_proj"][expert], (layer, "down_proj")
        rows = self.views[layer]["gate_up_proj"][expert]  # [2I, H]: gate rows, then up rows
        half = rows.shape[0] // 2
        return (rows[:half] if proj == self.names.gate else rows[half:]), (layer, "gate_up_proj")

    def count(self, part: tuple, elements: int) -> None:
        self.expert_elements[part] = self.expert_elements.get(part, 0) + elements

    def check_complete(self, path: Path) -> None:
        """Refuse a checkpoint that left an expert or a weight unwritten (tied weights count as written)."""
        for layer, views in zip(self.layers, self.views):
            for name, view in views.items():
                written = self.expert_elements.get((layer.index, name), 0)
                if written > view.numel():  # both the fused tensor and per-expert ones (_plan refuses exact twins)
                    raise ValueError(f"{path}: MoE layer {layer.index}'s {name} is {written} of {view.numel()} "
                                     "elements in the checkpoint: it holds these experts twice, fused and per "
                                     "expert; the checkpoint is damaged; copy it again")
                if written != view.numel():
                    raise ValueError(f"{path}: MoE layer {layer.index}'s {name} is {written} of {view.numel()} "
                                     "elements in the checkpoint: experts are missing; copy the whole checkpoint")
        done = {self.params[name].data_ptr() for name in self.loaded}
        missing = [name for name, t in self.params.items() if name not in self.loaded and t.data_ptr() not in done]
        if missing:
            raise ValueError(f"{path}: {len(missing)} weights are not in the checkpoint "
                             f"({', '.join(missing[:3])} ...); "
                             "it does not match its config.json")


@dataclass(frozen=True)
class _Item:
    """One tensor to read: its entry, where it goes, and the MoE layer whose store it fills (None: another
    weight)."""

    entry: _Entry
    target: torch.Tensor
    layer: int | None


def _check_size(shard: Path, entries: list[_Entry]) -> None:
    if entries and shard.stat().st_size < entries[-1].end:
        raise ValueError(f"{shard}: shorter than its header says; the file is truncated: copy the checkpoint again")


def _plan(places: _Places, path: Path) -> tuple[list[tuple[Path, list[_Item]]], list[str]]:
    """Every tensor to read, by file, checked (dtype, shape, file size, nothing twice, nothing missing); and the
    names of those that go nowhere. Reads headers only."""
    plan, unused, tied = [], [], set()
    # What each tensor fills -> (its name, its file), the first to claim it: a weight by its model name, an
    # expert part by its bytes in the store. A twin would be two readers writing the same bytes, and its element
    # count would hide a missing part from check_complete.
    claimed: dict[object, tuple[str, str]] = {}
    for shard in shard_files(path):
        entries = _entries(shard)
        _check_size(shard, entries)
        items = []
        for entry in entries:
            target, part = places.target(entry.key)
            if target is None:
                unused.append(entry.key)
                continue
            if entry.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{shard.name}: {entry.key} is {entry.dtype}; specmd reads float "
                                 f"checkpoints ({', '.join(FLOAT_DTYPES)}); quantized ones are not supported")
            if entry.shape != tuple(target.shape):
                raise ValueError(f"{shard.name}: {entry.key} has shape {list(entry.shape)} where the config "
                                 f"gives {list(target.shape)}: the checkpoint does not match its config.json")
            claim = places.model_name(entry.key) if part is None else (target.data_ptr(), target.numel())
            if claim in claimed:
                first, where = claimed[claim]
                name = entry.key if first == entry.key else f"{entry.key} (as {first})"
                raise ValueError(f"{name} appears twice ({where}, {shard.name}): the checkpoint is damaged; "
                                 "copy it again")
            claimed[claim] = (entry.key, shard.name)
            if part is None:
                # Tied weights under both names: read once (the first), so no two readers write one tensor.
                if target.data_ptr() in tied:
                    continue
                tied.add(target.data_ptr())
            else:
                places.count(part, target.numel())
            items.append(_Item(entry, target, None if part is None else part[0]))
        plan.append((shard, items))
    places.check_complete(path)
    return plan, unused


def _chunks(plan: list[tuple[Path, list[_Item]]]) -> list[tuple[Path, list[_Item]]]:
    """The reading tasks: runs of consecutive tensors of one file, about ``CHUNK_BYTES`` each, the earliest
    MoE layers first (their pinning can start while the later ones are read)."""
    chunks = []
    for shard, items in plan:
        run, size = [], 0
        for item in items:
            run.append(item)
            size += item.entry.end - item.entry.start
            if size >= CHUNK_BYTES:
                chunks.append((shard, run))
                run, size = [], 0
        if run:
            chunks.append((shard, run))
    layer = {id(run): min((i.layer for i in run if i.layer is not None), default=-1) for _, run in chunks}
    return sorted(chunks, key=lambda chunk: layer[id(chunk[1])])


class CheckpointRead(NamedTuple):
    """What ``read_checkpoint`` did: tensor bytes read, and the reader threads that read them."""

    bytes_read: int
    threads: int


def read_checkpoint(model: nn.Module, layers: list[MoELayer], store: HostStore, path: Path,
                    progress: bool = True, threads: int | None = None) -> CheckpointRead:
    """Copy every tensor of the checkpoint at ``path`` into ``model`` (its MoE layers' experts: the host
    store's rows; the rest: the parameters, already on their device) on ``threads`` reader threads (default
    ``READ_THREADS``), after checking that nothing is missing, twice, misshapen or of an unsupported dtype;
    submit each store buffer for pinning once its experts are in (the caller waits: ``store.wait_pinned``).
    Changes the model and the store; returns the bytes read and the readers used. A reader's error is raised
    here, as raised in the reader."""
    places = _Places(model, layers, store, CHECKPOINT_NAMES.get(model.config.model_type, CheckpointNames()))
    plan, unused = _plan(places, path)
    if unused:
        log.warning("specmd: %d tensors of %s match no weight of the model and were not read (%s ...)",
                    len(unused), path, ", ".join(unused[:3]))
    pending = [0] * len(layers)  # MoE layer -> its expert tensors not read yet
    for _, items in plan:
        for item in items:
            if item.layer is not None:
                pending[item.layer] += 1
    total = sum(item.entry.end - item.entry.start for _, items in plan for item in items)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checkpoint -> host store",
               disable=not progress, delay=0.5)
    lock = threading.Lock()  # guards pending and bar
    stop = threading.Event()  # a reader failed: the others stop at their next tensor

    def read(shard: Path, items: list[_Item]) -> None:
        with open(shard, "rb", buffering=0) as file, torch.no_grad():  # plain reads: no page counted twice
            _advise(file, items)
            for item in items:
                if stop.is_set():
                    return
                _read_tensor(file, item.entry, item.target, shard)
                with lock:
                    bar.update(item.entry.end - item.entry.start)
                    if item.layer is not None:
                        pending[item.layer] -= 1
                    complete = item.layer is not None and pending[item.layer] == 0
                if complete:
                    store.submit_pin(item.layer)

    chunks = _chunks(plan)
    threads = max(1, min(threads or READ_THREADS, len(chunks)))  # the pool starts no more threads than tasks
    with bar, ThreadPoolExecutor(threads, thread_name_prefix="specmd-read") as pool:
        futures = [pool.submit(read, shard, items) for shard, items in chunks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()), None)
            if failed is not None:
                raise failed
        except BaseException:  # a reader's error, or an interrupt here: no reader starts another tensor
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return CheckpointRead(total, threads)


def _advise(file, items: list[_Item]) -> None:
    """Ask the kernel to read the whole run ahead now (many requests in flight on a cold disk; a no-op on
    cached pages). Linux only; a hint, never required."""
    if hasattr(os, "posix_fadvise"):
        start, end = items[0].entry.start, items[-1].entry.end
        try:
            os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError as err:  # some file systems refuse it; the reads work without
            log.debug("specmd: posix_fadvise refused (%s)", err)
