"""Copies of a call's missed experts from the host store into their slots, for the cache decided on the
device: the Triton kernel of ``kernels/miss_gather.py`` on CUDA (it reads pinned host memory directly and
never syncs), plain indexed copies on the CPU (where reading the miss count costs nothing).

On CUDA the kernel reads the store through ``host_words``: each pinned layer buffer seen as a CUDA tensor of
32-bit words at the same address (unified addressing makes a pinned host pointer valid on the device). So
every tensor a decode step touches is a CUDA tensor, which is what lets torch.compile capture the whole step
as a CUDA graph (it skips graphs that read CPU tensors).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .copier import SlotPool
from .device_cache import DeviceCache, Misses
from .kernels import kernel
from .store import HostStore


class _CudaArray:
    """``__cuda_array_interface__`` of a pinned host buffer as int32 words; holds the buffer alive."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        rows = buffer.shape[0]
        self.__cuda_array_interface__ = {"shape": (rows, buffer[0].numel() * buffer.element_size() // 4),
                                         "typestr": "<i4", "data": (buffer.data_ptr(), False), "version": 3,
                                         "strides": None}


def host_words(buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pinned, contiguous [N, block] ``buffer`` as an [N, words] int32 CUDA tensor at the same address
    (no copy; reads cross the link). The result keeps ``buffer`` alive."""
    if not (buffer.is_pinned() and buffer.is_contiguous() and buffer[0].numel() * buffer.element_size() % 4 == 0):
        raise ValueError("host_words needs a pinned, contiguous buffer of whole 32-bit words per row")
    with torch.cuda.device(device):
        words = torch.as_tensor(_CudaArray(buffer), device=device)
    if words.data_ptr() != buffer.data_ptr():  # torch copied it: the memory was pinned for another device
        raise RuntimeError(f"the host store was pinned for another GPU than {device}, which cannot read it in "
                           "place; offload to the GPU that was current when the model was loaded, or use "
                           "engine='threaded'")
    return words


@torch.library.custom_op("specmd::gather_misses", mutates_args=())
def gather_misses(store: torch.Tensor, pool: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor,
                  count: torch.Tensor, then: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
    """``pool[slots[j]] = store[experts[j]]`` for j < ``count``, then a copy of ``then``. CUDA: ``store`` is
    ``host_words`` of a layer, one kernel launch, no sync; CPU: the layer's buffer, indexed copies.
    ``after`` is not read: passing a tensor orders the op after whatever produced it.

    Declared as mutating nothing, though it writes into ``pool``: the pool is the cache, updated in place
    every layer, and a declared mutation makes torch.compile copy the whole pool once per step (on the
    H200, OLMoE shapes at a 100% budget: 19.8 ms a step, against 7.2 ms declared as it is now). So the
    order must come from data dependencies, which the graph engine gives it: every read of the pool indexes
    it with the returned copy of ``then`` (the layer's slots), so it comes after the copies; and ``after`` is
    the layer's input (the previous layer's output), so the copies come after the previous layer's reads.
    (The routed ids alone would not do: under replay they come from a table, not from the hidden state.)"""
    if pool.is_cuda:
        kernel("miss_gather").gather_misses(store, pool.view(torch.int32), experts, slots, count)
    else:
        n = int(count)  # free on the CPU; the op is opaque to torch.compile, so no graph break
        pool.index_copy_(0, slots[:n], store[experts[:n]])
    return then.clone()


@gather_misses.register_fake
def _(store, pool, experts, slots, count, then, after):
    return torch.empty_like(then)


@torch.library.custom_op("specmd::cache_step", mutates_args=())
def cache_step(ids: torch.Tensor, layer: int, begin: bool, state: list[torch.Tensor], found: list[torch.Tensor],
               store: torch.Tensor, pool: torch.Tensor, after: torch.Tensor | None, dims: list[int],
               predicted: torch.Tensor | None, targets: list[int], prefetch_state: list[torch.Tensor],
               prefetch_found: list[torch.Tensor], prefetch_stores: list[torch.Tensor], fork: bool,
               prefetch_programs: int, score_weights: list[torch.Tensor], score_biases: list[torch.Tensor],
               score_buffers: list[torch.Tensor], score_k: int) -> torch.Tensor:
    """A whole cache call of ``layer`` on CUDA, no sync: ``kernels/cache_access.py`` decides hits, misses and
    victims for the routed ``ids`` and updates the cache's ``state`` (``DeviceCache.kernel_state``; ``found``:
    where it leaves the misses), then ``kernels/miss_gather.py`` copies the misses from ``store`` into
    ``pool``. Returns the layer's slots [E] after the copies, a new tensor.

    Then the prefetch calls, when ``predicted`` [D, C] names experts (-1: none) of the layers ``targets``
    (later layers of the same pass): each a cache call that never evicts this layer's experts
    (``DeviceCache.access``'s ``protect``) and its gather from ``prefetch_stores[j]``. With ``fork`` they run
    on a side stream that starts after this layer's copies and that the next call waits for (``_SideStream``):
    they overlap this layer's compute, and a CUDA graph captured around the calls keeps both (fork and join).
    Their gathers run on ``prefetch_programs`` programs (0: the full grid), leaving SMs to that compute.
    With ``score_weights`` (the targets' router weights; ``score_biases`` theirs, or empty) and no
    ``predicted``, the predictions are made there too: each router scores the layer's one-token input
    (``after``) and its ``score_k`` best experts are the candidates, as ``Predictor.predict`` ranks them; so
    the routers' products and top-k leave the model's stream, which only copies the input into
    ``score_buffers`` ([H] input, [D, E] logits, [D, E] their values).

    Declared as mutating nothing, like ``gather_misses`` and for the same reasons: the state and the pool
    are only ever read and written by these ops, the pool read through the returned slots (so after the
    copies), and ``after`` (the layer's input) orders the call after the previous layer's reads. A declared
    mutation would make torch.compile copy the pool."""
    side = _SideStream.of(pool.device)
    side.join()  # the previous layer's prefetches changed the state this call reads
    num_layers, num_experts, num_slots, policy = dims
    slots = torch.empty(num_experts, dtype=torch.int64, device=ids.device)
    experts, victims, count = found
    kernel("cache_access").access(ids, layer, begin, state, [experts, victims, count, slots], num_layers,
                                  num_experts, num_slots, policy)
    width = min(experts.shape[0], ids.numel())  # the gather's grid: at most tokens x top-k misses
    kernel("miss_gather").gather_misses(store, pool.view(torch.int32), experts[:width], victims[:width], count)
    if (predicted is None and not score_weights) or not targets:
        return slots
    # The side stream must read persistent memory only: a tensor freed here could be reused by the
    # model's stream while the side stream still reads it. So the predictions (or the input they are made
    # from) are copied into the cache's.
    *found_prefetch, prefetch_slots, held = prefetch_found
    if predicted is not None:
        held = held[:predicted.shape[0], :predicted.shape[1]]
        held.copy_(predicted)
    else:
        held = held[:len(score_weights), :score_k]
        score_buffers[0].copy_(after.reshape(-1))
    with side.fork() if fork else contextlib.nullcontext():
        if predicted is None:
            _score(score_weights, score_biases, score_buffers, held)
        p_experts, p_victims, p_count = found_prefetch
        for j, target in enumerate(targets):
            kernel("cache_access").access(held[j], target, False, prefetch_state,
                                          [p_experts, p_victims, p_count, prefetch_slots], num_layers, num_experts,
                                          num_slots, policy, protect=(layer, state[-1]))
            width = min(p_experts.shape[0], held.shape[1])
            kernel("miss_gather").gather_misses(prefetch_stores[j], pool.view(torch.int32), p_experts[:width],
                                                p_victims[:width], p_count, prefetch_programs)
    return slots


@cache_step.register_fake
def _(ids, layer, begin, state, found, store, pool, after, dims, predicted, targets, prefetch_state, prefetch_found,
      prefetch_stores, fork, prefetch_programs, score_weights, score_biases, score_buffers, score_k):
    return ids.new_empty(dims[1])


def _score(weights: list[torch.Tensor], biases: list[torch.Tensor], buffers: list[torch.Tensor],
           held: torch.Tensor) -> None:
    """``held[j]`` = the ids of the ``held.shape[1]`` highest logits of router j on the input in ``buffers[0]``
    (``cache_step``); into the buffers only, so it allocates nothing and runs on any stream."""
    hidden, logits, values = buffers
    k = held.shape[1]
    with torch.no_grad():  # predictions, never trained through
        for j, weight in enumerate(weights):
            # the products F.linear makes (Predictor's), so the candidates round the same
            x, out = hidden.view(1, -1), logits[j].view(1, -1)
            if biases:
                torch.addmm(biases[j], x, weight.t(), out=out)
            else:
                torch.mm(x, weight.t(), out=out)
            torch.topk(logits[j], k, out=(values[j, :k], held[j]))


class _SideStream:
    """The stream a layer's prefetches run on, one per device, and the event the next cache call waits for.

    Host-side bookkeeping only at the time the ops run: in a captured CUDA graph the fork (the side stream
    waits for the model's stream) and the join (the model's stream waits for the event) are edges of the graph,
    replayed without the host. Every fork is joined by the next cache call, which the graph engine makes in
    the same forward pass (prefetches target later layers of the pass only), so a capture never ends with
    the side stream's work unjoined."""

    _of: dict[torch.device, _SideStream] = {}

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record(self.stream)  # the CUDA event is created on its first record: now, not in a capture
        self.pending = False

    @classmethod
    def of(cls, device: torch.device) -> _SideStream:
        if device not in cls._of:
            cls._of[device] = cls(device)
        return cls._of[device]

    @contextlib.contextmanager
    def fork(self):
        """Run the body on the side stream, after everything queued so far on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:  # even after a failed launch: whatever was queued must be joined
            self.event.record(self.stream)
            self.pending = True

    def join(self) -> None:
        """The current stream waits for the last fork's work (nothing when none is pending)."""
        if self.pending:
            torch.cuda.current_stream(self.stream.device).wait_event(self.event)
            self.pending = False


class Scoring(NamedTuple):
    """What ``cache_step`` needs to make a step's predictions on the side stream (``score_*``)."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    buffers: list[torch.Tensor]
    k: int


class MissGather:
    """``gather(layer, misses, after)``: copy ``misses`` of ``layer`` into the pool, ordered after ``after``, on
    the current stream; returns ``misses.layer_slots`` after the copies (``gather_misses``)."""

    def __init__(self, store: HostStore, pool: SlotPool, device: torch.device,
                 prefetch_programs: int | None = None) -> None:
        if device.type == "cuda" and not store.pin:
            raise RuntimeError("engine='graph' reads the host store from the GPU, so it must be pinned (CUDA was "
                               "unavailable at load, or pinning failed: see its warning); use engine='threaded'")
        self._pool = pool
        # what the kernel reads each layer through; on CUDA fixed addresses torch.compile must be told of
        self._sources = [host_words(store.layer(i), device) if device.type == "cuda" else store.layer(i)
                         for i in range(store.num_layers)]
        self.tensors = self._sources if device.type == "cuda" else []
        if device.type == "cuda":
            _SideStream.of(device)  # made now, not inside a step that a CUDA graph may be capturing
        if prefetch_programs is None and device.type == "cuda":  # a quarter of the SMs copy, the compute keeps the rest
            prefetch_programs = max(1, torch.cuda.get_device_properties(device).multi_processor_count // 4)
        self.prefetch_programs = prefetch_programs or 0  # only the CUDA kernel reads it

    def __call__(self, layer: int, misses: Misses, after: torch.Tensor | None = None) -> torch.Tensor:
        return gather_misses(self._sources[layer], self._pool.data, misses.experts, misses.slots, misses.count,
                             misses.layer_slots, after)

    @property
    def fused(self) -> bool:
        """Whether ``step`` runs (CUDA): the cache call and the gather as one op of two launches."""
        return self._pool.data.is_cuda

    def step(self, cache: DeviceCache, layer: int, ids: torch.Tensor, after: torch.Tensor | None, begin: bool,
             predicted: torch.Tensor | None = None, targets: list[int] = (), fork: bool = False,
             scoring: Scoring | None = None) -> torch.Tensor:
        """``cache_step``: make the experts routed in ``ids`` resident in ``cache`` and copy the misses, then
        prefetch ``predicted`` (or what ``scoring`` predicts on the side stream) for ``targets``; the layer's
        slots after the copies."""
        dims = [cache.num_layers, cache.num_experts, cache.num_slots, cache.policy.kernel_id]
        weights, biases, buffers, k = scoring if scoring is not None else ([], [], [], 0)
        return cache_step(ids, layer, begin, cache.kernel_state(), cache.found, self._sources[layer],
                          self._pool.data, after, dims, predicted, list(targets), cache.kernel_state(prefetch=True),
                          cache.found_prefetch, [self._sources[t] for t in targets], fork, self.prefetch_programs,
                          weights, biases, buffers, k)

    def join(self) -> None:
        """The current stream waits for prefetches still running on the side stream (CUDA)."""
        if self.fused:
            _SideStream.of(self._pool.data.device).join()
