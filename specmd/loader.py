"""Reading a checkpoint's safetensors files straight into an offloaded model: each expert tensor from the
memory-mapped file into its rows of the pinned host store, every other tensor into its parameter on the
device, one tensor at a time, by plain reads of the file (no memory map: a mapped file's touched pages
would count as the process's memory). The experts never exist twice in host memory (transformers' own load makes
the whole model first; copying its experts into the store after would hold them twice).

Names: a checkpoint holds either the model's own fused tensors (``...experts.gate_up_proj``, what
transformers 5 keeps in memory) or the per-expert tensors of published checkpoints, under the family's
names (``runtime/adapters.CHECKPOINT_NAMES``, the part of transformers' conversion mapping the supported
families need: a new family's names are one entry there).
"""
from __future__ import annotations

import json
import logging
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class LoadReport:
    """What one checkpoint read cost: wall time, bytes of tensors read, and the process's peak resident host
    memory when it ended (Linux's ru_maxrss)."""

    seconds: float
    bytes_read: int
    host_peak_bytes: int

    def summary(self) -> str:
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (f"loaded {self.bytes_read / 2**30:.2f} GiB in {self.seconds:.1f} s ({rate:.2f} GB/s); host peak "
                f"{self.host_peak_bytes / 2**30:.2f} GiB")


def host_peak_bytes() -> int:
    """The process's peak resident memory so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: its dtype name, shape and byte range in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _entries(shard: Path) -> list[_Entry]:
    """The tensors of a safetensors file, from its header (8 bytes of length, then JSON), in file order."""
    with open(shard, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    entries = [_Entry(key, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0],
                      base + info["data_offsets"][1]) for key, info in header.items()]
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
    it is a CPU tensor of the file's dtype, contiguous per row (the store's experts), else through one
    temporary tensor of the entry's size."""
    dtype = FLOAT_DTYPES[entry.dtype]
    if target.device.type == "cpu" and target.dtype == dtype:
        rows = [target] if target.is_contiguous() else list(target)  # a fused [E, ...] view: contiguous per expert
        if all(row.is_contiguous() for row in rows):
            offset = entry.start
            for row in rows:
                _read_exactly(file, offset, row, shard)
                offset += row.numel() * row.element_size()
            return
    staging = torch.empty(entry.shape, dtype=dtype)
    _read_exactly(file, entry.start, staging, shard)
    target.copy_(staging)


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
                if written != view.numel():
                    raise ValueError(f"{path}: MoE layer {layer.index}'s {name} is {written} of {view.numel()} "
                                     "elements in the checkpoint: experts are missing; copy the whole checkpoint")
        done = {self.params[name].data_ptr() for name in self.loaded}
        missing = [name for name, t in self.params.items() if name not in self.loaded and t.data_ptr() not in done]
        if missing:
            raise ValueError(f"{path}: {len(missing)} weights are not in the checkpoint "
                             f"({', '.join(missing[:3])} ...); "
                             "it does not match its config.json")


def read_checkpoint(model: nn.Module, layers: list[MoELayer], store: HostStore, path: Path,
                    progress: bool = True) -> LoadReport:
    """Copy every tensor of the checkpoint at ``path`` into ``model`` (its MoE layers' experts: the host
    store's rows; the rest: the parameters, already on their device) and check that nothing is missing,
    misshapen or of an unsupported dtype. Changes the model and the store."""
    start = time.perf_counter()
    places = _Places(model, layers, store, CHECKPOINT_NAMES.get(model.config.model_type, CheckpointNames()))
    shards = [(shard, _entries(shard)) for shard in shard_files(path)]
    unused, bytes_read = [], 0
    bar = tqdm(total=sum(e.end - e.start for _, entries in shards for e in entries), unit="B", unit_scale=True,
               unit_divisor=1024, desc="checkpoint -> host store", disable=not progress, delay=0.5)
    with torch.no_grad(), bar:
        for shard, entries in shards:
            if entries and shard.stat().st_size < entries[-1].end:
                raise ValueError(f"{shard}: shorter than its header says; the file is truncated: copy the "
                                 "checkpoint again")
            with open(shard, "rb", buffering=0) as file:  # plain reads: no mapping, no page counted twice
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
                    _read_tensor(file, entry, target, shard)
                    bytes_read += entry.end - entry.start
                    bar.update(entry.end - entry.start)
                    if part is not None:
                        places.count(part, target.numel())
    places.check_complete(path)
    if unused:
        log.warning("specmd: %d tensors of %s match no weight of the model and were not read (%s ...)",
                    len(unused), path, ", ".join(unused[:3]))
    return LoadReport(time.perf_counter() - start, bytes_read, host_peak_bytes())
