"""One call of the cache decided on the device (``specmd/runtime/device_cache.py``, ``DeviceCache.access``)
as one kernel launch: the hit/miss test, the counters, the victims (free slots first, then the policy's
order), the table and owner updates and the policy's record of the accesses.

Why one kernel: the same call as torch operations is about 135 small ops, 40-odd kernels after inductor's
fusion, two of them sorts; at OLMoE shapes that is 170 us per layer inside a CUDA graph (H200, issue 11),
more than the layer's compute. Here one program does it all: the state is tiny (a few KiB) and a call
changes at most tokens x top-k entries.

Exactness: the victims are the first ``count`` slots in the lexicographic order (primary, secondary, slot)
that the torch version gets from two stable sorts; here the j-th victim is the smallest key strictly greater
than the (j-1)-th (keys are distinct, the slot index breaks ties), found by three min-reductions per tile of
slots. ``tests/test_device_cache.py`` compares this kernel with the torch version on recorded traces.

One program (a thread block); its phases read what other threads of the block wrote, so a barrier
(``tl.debug_barrier``, __syncthreads, which also orders global memory within the block) separates them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# DevicePolicy.kernel_id of each device policy (specmd/runtime/device_policies.py); constexpr, which is how a
# Triton kernel may read a module's globals
LRU, FIFO, LFU, LAYER_DISTANCE, LEAST_STALE = (tl.constexpr(i) for i in range(5))
INT64_MAX = tl.constexpr(2**63 - 1)
TILE = 1024  # slots per step of the victim search


@triton.jit
def _sort_keys(s_idx, layer, owner, scratch, protect, protect_layer, last, lfu_count, touched, pass_number,
               E: tl.constexpr, S: tl.constexpr, L: tl.constexpr, POLICY: tl.constexpr, PREFETCH: tl.constexpr):
    """(primary, secondary) of the slots ``s_idx``: -1 and the slot for free slots, INT64_MAX for slots this
    call uses (and, for a prefetch call, those of the demand call it follows), else the policy's keys
    (DevicePolicy.sort_keys)."""
    in_s = s_idx < S
    own = tl.load(owner + s_idx, mask=in_s, other=-1)
    free = own < 0
    key = tl.maximum(own, 0)
    own_layer = key // E
    used = (~free) & (own_layer == layer)
    used = used & (tl.load(scratch + key % E, mask=in_s & used, other=0) != 0)
    if PREFETCH:
        computing = (~free) & (own_layer == protect_layer)
        used = used | (computing & (tl.load(protect + key % E, mask=in_s & computing, other=0) != 0))
    secondary = tl.load(last + s_idx, mask=in_s, other=0)
    if POLICY == LFU:
        primary = tl.load(lfu_count + key, mask=in_s, other=0)
    elif POLICY == LAYER_DISTANCE:
        distance = ((own_layer - layer) % L + L) % L  # C remainder: keep it non-negative
        primary = (L - distance).to(tl.int64)
    elif POLICY == LEAST_STALE:
        primary = (tl.load(touched + s_idx, mask=in_s, other=-1) == tl.load(pass_number)).to(tl.int64)
    else:
        primary = tl.zeros_like(secondary)
    primary = tl.where(free, -1, tl.where(used, INT64_MAX, primary))
    secondary = tl.where(free, s_idx.to(tl.int64), secondary)
    return primary, secondary


@triton.jit
def _access(ids, n_ids, layer, begin, protect_layer, table, owner, ever_loaded, evicted, clock, counters, passes,
            last, lfu_count, touched, pass_number, fresh, scratch, protect, experts_out, victims_out, count_out,
            slots_out,
            E: tl.constexpr, S: tl.constexpr, L: tl.constexpr, POLICY: tl.constexpr, PREFETCH: tl.constexpr,
            BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, TILE_S: tl.constexpr):
    keys_total = L * E + 1  # flat keys, with the spare one
    if begin != 0:  # DeviceCache.begin_pass
        for start in range(0, keys_total, TILE_S):
            offs = start + tl.arange(0, TILE_S)
            tl.store(evicted + offs, tl.zeros([TILE_S], dtype=tl.int1), mask=offs < keys_total)
        tl.store(passes, tl.load(passes) + 1)
        if POLICY == LEAST_STALE:
            tl.store(pass_number, tl.load(pass_number) + 1)
        tl.debug_barrier()

    # The call's experts: needed, hits, misses; the counters.
    e = tl.arange(0, BLOCK_E)
    in_e = e < E
    needed = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, n_ids, BLOCK_N):
        k = start + tl.arange(0, BLOCK_N)
        routed = tl.load(ids + k, mask=k < n_ids, other=-1)
        needed = tl.maximum(needed, tl.max((routed[None, :] == e[:, None]).to(tl.int32), axis=1))
    row = tl.load(table + layer * (E + 1) + e, mask=in_e, other=-1)
    need = needed != 0
    hit = need & (row >= 0)
    miss = need & (row < 0)
    key = layer * E + e
    loaded = tl.load(ever_loaded + key, mask=in_e, other=0) != 0
    collided = tl.load(evicted + key, mask=in_e, other=0) != 0
    here = counters + layer  # counters [9, L + 1]: counter i of this layer at i * (L + 1) + layer (COUNTERS)
    if not PREFETCH:  # a prefetch call accessed nothing; its copies are counted once the victims are known
        tl.store(here, tl.load(here) + tl.sum(need.to(tl.int64)))
        tl.store(here + (L + 1), tl.load(here + (L + 1)) + tl.sum(hit.to(tl.int64)))
        tl.store(here + 2 * (L + 1), tl.load(here + 2 * (L + 1)) + tl.sum((miss & ~loaded).to(tl.int64)))
        tl.store(here + 3 * (L + 1), tl.load(here + 3 * (L + 1)) + tl.sum((miss & loaded & ~collided).to(tl.int64)))
        tl.store(here + 4 * (L + 1), tl.load(here + 4 * (L + 1)) + tl.sum((miss & loaded & collided).to(tl.int64)))
        # a hit on a prefetched expert's first demand access is a prefetch hit; the slot is no longer fresh
        hit_slot = tl.where(hit, row, S)
        was_fresh = tl.load(fresh + hit_slot, mask=hit, other=0) != 0
        tl.store(here + 7 * (L + 1), tl.load(here + 7 * (L + 1)) + tl.sum((hit & was_fresh).to(tl.int64)))
        tl.store(fresh + hit_slot, tl.zeros([BLOCK_E], dtype=tl.int1), mask=hit)
    count = tl.sum(miss.to(tl.int32))
    tl.store(experts_out + tl.cumsum(miss.to(tl.int32), 0) - 1, e.to(tl.int64), mask=miss)  # ascending
    tl.store(scratch + e, needed.to(tl.int8), mask=in_e)
    tl.debug_barrier()

    # Victims: the j-th is the smallest (primary, secondary, slot) above the (j-1)-th.
    prev_p = tl.full([], -2, tl.int64)
    prev_s = tl.full([], 0, tl.int64)
    prev_i = tl.full([], 0, tl.int64)
    found = tl.full([], 0, tl.int32)  # victims that are not in use: short of count only for a prefetch call
    for j in range(0, tl.minimum(count, S)):  # no call has more victims than slots
        best_p = tl.full([], INT64_MAX, tl.int64)
        best_s = tl.full([], INT64_MAX, tl.int64)
        best_i = tl.full([], INT64_MAX, tl.int64)
        for start in range(0, S, TILE_S):
            s_idx = start + tl.arange(0, TILE_S)
            p, s = _sort_keys(s_idx, layer, owner, scratch, protect, protect_layer, last, lfu_count, touched,
                              pass_number, E, S, L, POLICY, PREFETCH)
            i = s_idx.to(tl.int64)
            above = (s_idx < S) & ((p > prev_p) | ((p == prev_p) & ((s > prev_s) | ((s == prev_s) & (i > prev_i)))))
            tile_p = tl.min(tl.where(above, p, INT64_MAX), axis=0)
            at_p = above & (p == tile_p)
            tile_s = tl.min(tl.where(at_p, s, INT64_MAX), axis=0)
            tile_i = tl.min(tl.where(at_p & (s == tile_s), i, INT64_MAX), axis=0)
            better = (tile_p < best_p) | ((tile_p == best_p) & ((tile_s < best_s) |
                                                                ((tile_s == best_s) & (tile_i < best_i))))
            best_p = tl.where(better, tile_p, best_p)
            best_s = tl.where(better, tile_s, best_s)
            best_i = tl.where(better, tile_i, best_i)
        tl.store(victims_out + j, best_i)
        found += (best_p < INT64_MAX).to(tl.int32)
        prev_p, prev_s, prev_i = best_p, best_s, best_i
    # A prefetch that finds no free slot is dropped (SlotCache._evict drops them too, but in the predictor's
    # rank order, worst first; here the highest expert ids go first).
    count = found
    miss = miss & (tl.cumsum(miss.to(tl.int32), 0) - 1 < count)
    tl.store(count_out, count.to(tl.int64))
    if PREFETCH:
        tl.store(here + 6 * (L + 1), tl.load(here + 6 * (L + 1)) + count.to(tl.int64))
    tl.debug_barrier()

    # Evict the victims' keys, then publish the misses in their slots.
    valid = e < count
    victim = tl.load(victims_out + e, mask=valid, other=S)
    expert = tl.load(experts_out + e, mask=valid, other=0)
    old = tl.load(owner + victim, mask=valid, other=-1)
    gone = valid & (old >= 0)
    old_key = tl.maximum(old, 0)
    tl.store(table + (old_key // E) * (E + 1) + old_key % E, tl.full([BLOCK_E], -1, tl.int64), mask=gone)
    tl.store(evicted + old_key, tl.full([BLOCK_E], 1, tl.int1), mask=gone)
    tl.atomic_add(counters + 5 * (L + 1) + old_key // E, tl.full([BLOCK_E], 1, tl.int64), mask=gone)
    wasted = gone & (tl.load(fresh + victim, mask=gone, other=0) != 0)  # prefetched, never accessed
    tl.atomic_add(counters + 8 * (L + 1) + old_key // E, tl.full([BLOCK_E], 1, tl.int64), mask=wasted)
    tl.debug_barrier()
    tl.store(table + layer * (E + 1) + expert, victim, mask=valid)
    tl.store(owner + victim, layer * E + expert, mask=valid)
    tl.store(ever_loaded + layer * E + expert, tl.full([BLOCK_E], 1, tl.int1), mask=valid)
    if PREFETCH:  # the victims now hold this call's experts: fresh when a prefetch brought them
        tl.store(fresh + victim, tl.full([BLOCK_E], 1, tl.int1), mask=valid)
    else:
        tl.store(fresh + victim, tl.zeros([BLOCK_E], dtype=tl.int1), mask=valid)
    tl.debug_barrier()

    # The policy records the call's accesses (a prefetch call: its insertions, and for least-stale its touches)
    # in ascending expert order, one clock tick each.
    if PREFETCH and POLICY != LEAST_STALE:
        rec = miss
    else:
        rec = miss | hit  # not ``need``: a prefetch's dropped misses are not recorded
    tick0 = tl.load(clock)
    ticks = tick0 + tl.cumsum(rec.to(tl.int64), 0)
    tl.store(clock, tick0 + tl.sum(rec.to(tl.int64)))
    row = tl.load(table + layer * (E + 1) + e, mask=in_e, other=-1)
    tl.store(slots_out + e, row, mask=in_e)
    slot = tl.where(rec, row, S)
    if POLICY == FIFO:
        tl.store(last + slot, ticks, mask=miss)
    elif POLICY == LEAST_STALE:
        pass_now = tl.load(pass_number)
        first_touch = miss | (tl.load(touched + slot, mask=rec, other=-1) != pass_now)
        tl.store(last + slot, ticks, mask=rec & first_touch)
        tl.store(touched + slot, tl.zeros_like(ticks) + pass_now, mask=rec)
    else:
        tl.store(last + slot, ticks, mask=rec)
        if POLICY == LFU:
            tl.store(lfu_count + key, tl.load(lfu_count + key, mask=rec, other=0) + 1, mask=rec)


def access(ids: torch.Tensor, layer: int, begin: bool, state: list[torch.Tensor], outputs: list[torch.Tensor],
           num_layers: int, num_experts: int, num_slots: int, policy: int,
           protect: tuple[int, torch.Tensor] | None = None) -> None:
    """One ``DeviceCache.access`` of ``layer`` for the routed ``ids`` (any shape, int64) on the current stream,
    after ``DeviceCache.begin_pass`` when ``begin``. ``state``: table, owner, ever_loaded, evicted_this_pass,
    clock, counters, passes, policy.last, LFU count, least-stale touched pass and pass number (the last three
    any tensor where the policy has none), the [S + 1] fresh flags (prefetched, not yet accessed), and an [E]
    int8 scratch; ``outputs``: the misses' experts [K] and
    slots [K] (their first ``count`` entries written), ``count`` [1], the layer's slots [E] after the call.
    ``protect``: (layer, the scratch of its demand call) makes this a prefetch call (``DeviceCache.access``).
    One launch; never syncs."""
    flat = ids.reshape(-1)
    protect_layer, protect_mask = protect if protect is not None else (-1, state[-1])
    _access[(1,)](flat, flat.shape[0], layer, int(begin), protect_layer, *state, protect_mask, *outputs,
                  E=num_experts, S=num_slots, L=num_layers, POLICY=policy, PREFETCH=protect is not None,
                  BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_N=64,
                  TILE_S=min(TILE, triton.next_power_of_2(max(num_slots, num_layers * num_experts + 1))))
