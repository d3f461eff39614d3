"""The slot cache decided on the device: the table, the slot owners, the policy state and the counters are
tensors, and a call is a fixed sequence of tensor operations with static shapes, so the host never waits
for the device and a decode step can be captured as a CUDA graph.

Legend: L MoE layers, E experts per layer, S slots, K = min(E, S) the most misses one call can have.
Masked writes land in one spare entry past the end of each tensor (slot S, key L*E, layer L), never read.

One call (``access``) is one acquire of the threaded cache (``cache.py``) with the same outcome: the
called layer's resident experts are hits, the others misses; the misses, in ascending expert order, take
the free slots in ascending order and then the policy's victims among the slots this call does not use;
misses are cold (never loaded), collision (evicted earlier in this pass) or capacity (the rest).
``tests/test_device_cache.py`` drives both caches with recorded traces and compares every counter.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .device_policies import DEVICE_POLICIES, DevicePolicy
from .metrics import LayerStats

COUNTERS = ("accesses", "hits", "misses_cold", "misses_capacity", "misses_collision", "evictions", "prefetches",
            "prefetch_hits", "wasted_prefetches")


@dataclass(frozen=True)
class Misses:
    """The copies one call needs: expert ``experts[j]`` of the call's layer into slot ``slots[j]``, for the
    first ``count`` entries (``valid``); [K] each, on the device."""

    experts: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor
    layer_slots: torch.Tensor  # [E] the slot of each expert of the layer (-1: not resident), after the copies


class Gather(Protocol):
    """The copies of the misses into the pool (``gather.MissGather``)."""

    fused: bool  # whether ``step`` runs: the whole call and its copies as one op

    def __call__(self, layer: int, misses: Misses, after: torch.Tensor | None) -> torch.Tensor:
        """Copy the missed experts into their slots once ``after`` (a tensor of the layer's input, or None)
        exists; return the layer's slots as a tensor that comes after the copies (the layer's compute indexes
        the pool with it)."""

    def step(self, cache: DeviceCache, layer: int, ids: torch.Tensor, after: torch.Tensor | None, begin: bool,
             predicted: torch.Tensor | None, targets: Sequence[int], fork: bool, scoring=None) -> torch.Tensor:
        """``DeviceCache.step`` in one op (``scoring``: ``gather.Scoring``)."""

    def join(self) -> None:
        """Wait for copies still running on another stream."""


class DeviceCache:
    """``num_slots`` slots over ``num_layers`` x ``num_experts`` experts with a device ``policy``; the
    copies each call needs go to ``gather`` (``runtime/gather.py``; None: copy nothing, as the tests do)."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, policy: str, device: torch.device,
                 gather: Gather | None = None) -> None:
        if policy not in DEVICE_POLICIES:
            raise ValueError(f"engine='graph' decides evictions on the device, where {policy!r} has no "
                             f"counterpart; choose one of: {', '.join(sorted(DEVICE_POLICIES))}")
        L, E, S = num_layers, num_experts, num_slots
        self.num_layers, self.num_experts, self.num_slots = L, E, S
        self.width = min(E, S)  # K
        self.device = device
        self._gather = gather
        # Normal tensors even when offload runs under inference_mode: a later generate updates them in place.
        with torch.inference_mode(False):
            self._make_state(L, E, S, policy, device)

    def _make_state(self, L: int, E: int, S: int, policy: str, device: torch.device) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        self.table = torch.full((L, E + 1), -1, **i64)  # [L, E + 1] -> slot, -1 when not resident
        self.owner = torch.full((S + 1,), -1, **i64)  # [S + 1] -> flat key layer * E + expert, -1 when free
        self.ever_loaded = torch.zeros(L * E + 1, dtype=torch.bool, device=device)
        self.evicted_this_pass = torch.zeros(L * E + 1, dtype=torch.bool, device=device)
        # [S + 1] the slot holds an expert a prefetch call brought that no demand call has accessed yet
        self.fresh = torch.zeros(S + 1, dtype=torch.bool, device=device)
        self.clock = torch.zeros((), **i64)
        self.counters = torch.zeros(len(COUNTERS), L + 1, **i64)  # [counter, layer]
        self.passes = torch.zeros((), **i64)  # forward passes, counted on the device (compiled steps too)
        self.policy: DevicePolicy = DEVICE_POLICIES[policy](S, L * E, device)
        self._experts = torch.arange(E, **i64)
        self._slots = torch.arange(S + 1, **i64)
        # kernels/cache_access.py: the needed mask it shares between its phases (a prefetch call reads the
        # demand call's as the experts it must not evict); the misses it found
        self._scratch = torch.zeros(E, dtype=torch.int8, device=device)
        self._scratch_prefetch = torch.zeros(E, dtype=torch.int8, device=device)
        self.found = [torch.zeros(self.width, **i64), torch.zeros(self.width, **i64), torch.zeros(1, **i64)]
        # a prefetch call's misses (up to one per candidate, E at most: the kernel writes them all before it
        # drops those no slot is left for), the slots it leaves, and the predictions it reads (lookahead <= 3)
        self.found_prefetch = [torch.zeros(E, **i64), torch.zeros(E, **i64), torch.zeros(1, **i64),
                               torch.zeros(E, **i64), torch.full((3, E), -1, **i64)]

    def begin_pass(self) -> None:
        """A new forward pass starts: collisions are counted afresh (changes state)."""
        self._settle()
        self.evicted_this_pass.zero_()
        self.passes += 1
        self.policy.begin_pass()

    def set_position(self, position: int, layer: int, num_layers: int) -> None:
        """The main loop's notice that ``layer`` runs (``SlotCache.set_position``): the device policies take
        the layer with each call, and no prefetch is pending."""

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """``SlotCache.acquire`` for the main loop's chunks: make the distinct ``experts`` resident and return
        their slots in the same order; reads the slots back (one sync)."""
        ids = torch.tensor(list(experts), device=self.device)
        return self.access(layer, self._mask(ids)).layer_slots[ids].tolist()

    def release(self, slots: Sequence[int]) -> None:
        """Nothing to do: every copy and read runs on the one stream, in order."""

    def access(self, layer: int, needed: torch.Tensor, width: int | None = None,
               after: torch.Tensor | None = None, protect: tuple[int, torch.Tensor] | None = None) -> Misses:
        """Make the experts ``needed`` [E] bool of ``layer`` resident (changes state; no host sync); returns
        the copies it made through ``gather``, ``width`` of them at most (default min(E, S); a decode step passes
        its T*k so the gather's grid stays small). At most S experts may be needed (the main loop chunks wider
        calls).

        ``protect``: (the demand call's layer, its needed [E]) makes this a *prefetch* call, made right after
        that demand call while its experts are being computed: their slots are never victims; the call
        counts the copies it makes as prefetches (not accesses, hits or misses) and records them in the policy
        as insertions (``SlotCache._prefetch``), and the resident predicted experts as touched (least-stale
        only; ``SlotCache._predicted_resident``)."""
        self._settle()
        E, S = self.num_experts, self.num_slots
        K = min(self.width, width or self.width)
        row = self.table[layer, :E]  # [E] slot of each expert of this layer, -1 when not resident
        resident = row >= 0
        hits, missed = needed & resident, needed & ~resident
        keys = layer * E + self._experts  # [E] flat keys
        if protect is None:
            loaded, collided = self.ever_loaded[keys], self.evicted_this_pass[keys]
            self._count(layer, needed, hits, missed & ~loaded, missed & loaded & ~collided,
                        missed & loaded & collided)
            # a hit on a prefetched expert's first demand access is a prefetch hit; the slot is no longer fresh
            hit_slots = torch.where(hits, row, S)
            self.counters[COUNTERS.index("prefetch_hits"), layer].add_((self.fresh[hit_slots] & hits).sum())
            self.fresh.index_fill_(0, hit_slots, False)

        # Victims: free slots (ascending), then the policy's order among slots this call does not use.
        in_use = torch.zeros(S + 1, dtype=torch.bool, device=self.device)
        in_use.index_put_((torch.where(hits, row, S),), torch.ones_like(hits))
        if protect is not None:
            protect_layer, protect_needed = protect
            computing = self.table[protect_layer, :E]
            in_use.index_put_((torch.where(protect_needed & (computing >= 0), computing, S),),
                              torch.ones_like(protect_needed))
        primary, secondary = self.policy.sort_keys(self.owner, layer, self.num_layers, E)
        free = self.owner < 0  # free slots first, in ascending order; slots in use never
        primary = torch.where(free, -1, torch.where(in_use, torch.iinfo(torch.int64).max, primary))[:S]
        secondary = torch.where(free, self._slots, secondary)[:S]
        by_secondary = torch.sort(secondary, stable=True).indices  # lexicographic: two stable sorts
        victims = by_secondary[torch.sort(primary[by_secondary], stable=True).indices][:K]  # [K]
        experts = torch.sort((~missed).to(torch.int8), stable=True).indices[:K]  # [K] misses first, ascending
        # A prefetch that finds no slot free of use is dropped (SlotCache._evict drops them too, but worst-ranked
        # first; here the highest expert ids go first, as the kernel does).
        count = torch.minimum(missed.sum(), (primary < torch.iinfo(torch.int64).max).sum())
        missed = missed & (torch.cumsum(missed.to(torch.int64), 0) <= count)
        if protect is not None:
            self.counters[COUNTERS.index("prefetches"), layer].add_(count)
        valid = torch.arange(K, device=self.device) < count

        # Evict the victims' keys, then publish the misses in their slots.
        old = self.owner[victims]  # [K] flat keys (-1: free)
        evicted = valid & (old >= 0)
        spare_key = self.num_layers * E
        old_key = torch.where(evicted, old, spare_key)
        old_layer = torch.div(old_key, E, rounding_mode="floor")
        # index_fill_ takes its value as a scalar: no host tensor to copy (a CUDA graph refuses that copy)
        self.table.view(-1).index_fill_(0, torch.where(evicted, old_layer * (E + 1) + old % E, E), -1)  # E: spare
        self.evicted_this_pass.index_fill_(0, old_key, True)
        self.counters[COUNTERS.index("evictions")].index_put_((old_layer,), evicted.long(), accumulate=True)
        wasted = evicted & self.fresh[victims]  # prefetched, evicted before any demand access
        self.counters[COUNTERS.index("wasted_prefetches")].index_put_((old_layer,), wasted.long(), accumulate=True)
        # the victims now hold this call's experts: fresh when a prefetch brought them
        self.fresh.index_fill_(0, torch.where(valid, victims, S), protect is not None)
        self.fresh.narrow(0, S, 1).fill_(False)
        self.evicted_this_pass.narrow(0, spare_key, 1).fill_(False)  # not ``[i] = False``: a host tensor copy
        self.table[layer].index_put_((torch.where(valid, experts, E),), victims)
        self.owner.index_put_((torch.where(valid, victims, S),), layer * E + experts)
        self.ever_loaded.index_fill_(0, torch.where(valid, layer * E + experts, spare_key), True)
        recorded = needed if protect is None else missed | (hits & self.policy.touches_predicted)
        self._record(layer, recorded, missed, keys)
        misses = Misses(experts, victims, valid, count, self.slots(layer))
        if self._gather is not None:
            misses = replace(misses, layer_slots=self._gather(layer, misses, after))
        return misses

    def step(self, layer: int, ids: torch.Tensor, after: torch.Tensor | None = None, begin: bool = False,
             predicted: torch.Tensor | None = None, targets: Sequence[int] = (), fork: bool = False,
             scoring=None) -> torch.Tensor:
        """A decode step's call: make the experts routed in ``ids`` resident (after ``begin_pass`` when
        ``begin``) and copy the misses through the gather; returns the layer's slots [E] after the copies, for
        the compute to index the pool with. Then prefetch: for each of ``targets`` (later layers), a prefetch
        call (``access``'s ``protect``) of the experts in that row of ``predicted`` [D, C] (-1: none); ``fork``
        runs them on a side stream (CUDA; see ``gather.cache_step``), and with ``scoring`` (``gather.Scoring``,
        in place of ``predicted``) makes the predictions there too. On CUDA the gather's fused op; else
        ``access`` calls."""
        if self._gather is not None and self._gather.fused:
            return self._gather.step(self, layer, ids, after, begin, predicted, targets, fork, scoring)
        if scoring is not None:
            raise ValueError("scoring on the side stream needs the fused CUDA step; pass the predictions")
        if begin:
            self.begin_pass()
        needed = self._mask(ids)
        slots = self.access(layer, needed, width=ids.numel(), after=after).layer_slots
        for row, target in zip(predicted if predicted is not None else (), targets):
            self.access(target, self._mask(row), width=row.numel(), protect=(layer, needed))
        return slots

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[E] bool: the experts named in ``ids`` (-1 names none)."""
        ids = ids.reshape(-1)
        mask = torch.zeros(self.num_experts + 1, dtype=torch.bool, device=ids.device)
        return mask.index_fill_(0, torch.where(ids >= 0, ids, self.num_experts), True)[:self.num_experts]

    def access_ids(self, layer: int, ids: torch.Tensor, begin: bool = False,
                   protect_layer: int | None = None) -> Misses:
        """``access`` of the experts routed in ``ids`` (int64, any shape; -1 names none), after ``begin_pass``
        when ``begin``, by one launch of the Triton kernel ``kernels/cache_access.py`` (CUDA; on the CPU
        under TRITON_INTERPRET=1, for the tests); no host sync. ``protect_layer``: a prefetch call after the
        last demand call, of that layer (``access``'s ``protect``). Same outcome as ``access``, gather
        excepted: ``layer_slots`` is a new tensor; the misses' tensors are the cache's own, overwritten by the
        next call."""
        from .kernels import kernel

        prefetch = protect_layer is not None
        K = min(self.width, ids.numel())
        slots = torch.empty(self.num_experts, dtype=torch.int64, device=self.device)
        experts, victims, count = (self.found_prefetch if prefetch else self.found)[:3]
        kernel("cache_access").access(ids, layer, begin, self.kernel_state(prefetch), [experts, victims, count, slots],
                                      self.num_layers, self.num_experts, self.num_slots, self.policy.kernel_id,
                                      (protect_layer, self._scratch) if prefetch else None)
        valid = torch.arange(K, device=self.device) < count
        return Misses(experts[:K], victims[:K], valid, count.view(()), slots)

    def kernel_state(self, prefetch: bool = False) -> list[torch.Tensor]:
        """The state in the order ``kernels/cache_access.py`` takes it; a prefetch call has its own scratch
        (the demand call's says what it must not evict)."""
        return [self.table, self.owner, self.ever_loaded, self.evicted_this_pass, self.clock, self.counters,
                self.passes, *self.policy.kernel_state(), self.fresh,
                self._scratch_prefetch if prefetch else self._scratch]

    def slots(self, layer: int) -> torch.Tensor:
        """[E] the slot of each expert of ``layer`` (-1 where not resident); a view."""
        return self.table[layer, :self.num_experts]

    def stats(self, expert_bytes: int) -> list[LayerStats]:
        """The counters per layer; reads the device (one sync, when asked, never per token)."""
        self._settle()
        values = self.counters[:, :self.num_layers].tolist()
        layers = []
        for layer in range(self.num_layers):
            counts = {name: values[i][layer] for i, name in enumerate(COUNTERS)}
            misses = counts["misses_cold"] + counts["misses_capacity"] + counts["misses_collision"]
            copies = misses + counts["prefetches"]  # every copy, demand or prefetch (as SlotCache counts)
            wasted = counts.pop("wasted_prefetches")
            layers.append(LayerStats(**counts, bytes_copied=copies * expert_bytes,
                                     prefetch_bytes=counts["prefetches"] * expert_bytes,
                                     wasted_prefetch_bytes=wasted * expert_bytes))
        return layers

    def reset_counters(self) -> None:
        """Zero the counters; the cached experts stay (changes state)."""
        self._settle()
        self.counters.zero_()
        self.passes.zero_()

    def _settle(self) -> None:
        """Before torch operations read or change the state: wait for prefetch calls still running on the
        gather's side stream (CUDA)."""
        if self._gather is not None:
            self._gather.join()

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a call reads or updates in place (the state, the policy's, the gather's): their
        addresses never change, which torch.compile must be told to capture a step that updates them."""
        state = [value for value in vars(self).values() if isinstance(value, torch.Tensor)]
        state += self.found + self.found_prefetch
        policy = [value for value in vars(self.policy).values() if isinstance(value, torch.Tensor)]
        return state + policy + list(getattr(self._gather, "tensors", ()))

    def resident(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> slot of every resident expert; reads the device."""
        self._settle()
        owners = self.owner[:self.num_slots].tolist()
        return {divmod(key, self.num_experts): slot for slot, key in enumerate(owners) if key >= 0}

    def _count(self, layer: int, *masks: torch.Tensor) -> None:
        for i, mask in enumerate(masks[:5]):
            self.counters[i, layer].add_(mask.sum())  # in place: no setitem copy

    def _record(self, layer: int, needed: torch.Tensor, missed: torch.Tensor, keys: torch.Tensor) -> None:
        """The policy sees the call's accesses in ascending expert order, one clock tick each."""
        S = self.num_slots
        ticks = self.clock + torch.cumsum(needed.to(torch.int64), 0)  # [E]
        self.clock += needed.sum()
        slots = torch.where(needed, self.table[layer, :self.num_experts], S)
        self.policy.update(slots, torch.where(needed, keys, self.num_layers * self.num_experts), ticks, missed)
