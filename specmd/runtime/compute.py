"""Expert compute on the slot pool, with the model's own gate function and the same kernels as transformers.

Legend: R routed (token, expert) rows of one chunk, H hidden, I expert intermediate, S slots.
Rows arrive sorted by slot, so each slot's rows are contiguous (``groups``) as grouped kernels need.

Which kernel runs is the one transformers would have run for the same call (``KernelPlan``): in bf16 a
row's result depends on the kernel (batched products vs grouped products round differently), so
mirroring transformers' choice is what keeps the output bit-identical to the unpatched model's.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ExpertLayout

# torch._grouped_mm refuses 1024 groups or more (its message says "more than 1024"); a larger pool is
# covered by several calls over windows of slots.
GROUPED_MM_MAX_GROUPS = 1023


class Kernel(enum.Enum):
    GROUPED = "grouped"  # one grouped product over the slot-sorted rows (a loop over slots where unavailable)
    BATCHED = "batched"  # gather each row's expert weight, batched products (transformers' batched_mm)
    LOOP = "loop"  # one product per slot (transformers' eager loop over experts)


@dataclass(frozen=True)
class KernelPlan:
    """The kernel for prefill-like calls and for decode steps of ``generate``."""

    prefill: Kernel
    decode: Kernel

    @classmethod
    def mirroring(cls, implementation: str, device_type: str) -> "KernelPlan":
        """What transformers runs for ``implementation`` (the model's experts implementation before
        offload): ``generate`` switches grouped_mm to batched_mm for decode off the CPU."""
        if implementation == "grouped_mm":
            return cls(Kernel.GROUPED, Kernel.BATCHED if device_type != "cpu" else Kernel.GROUPED)
        if implementation == "batched_mm":
            return cls(Kernel.BATCHED, Kernel.BATCHED)
        return cls(Kernel.LOOP, Kernel.LOOP)


def grouped_mm_fn():
    """torch's grouped product (``F.grouped_mm``, else ``torch._grouped_mm``), or None where it has none."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _linear(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    # w: [out, in], or [in, out] when transposed
    return x @ w if transposed else x @ w.transpose(-2, -1)


@dataclass(frozen=True)
class GroupedCall:
    """One grouped product: rows [first_row, end_row) against slots [first_slot, end_slot)."""

    first_row: int
    end_row: int
    first_slot: int
    end_slot: int
    offsets: torch.Tensor  # [end_slot - first_slot] int32 cumulative row counts, on the device


def grouped_calls(groups: Sequence[tuple[int, int, int]], num_slots: int, device: torch.device) -> list[GroupedCall]:
    """The grouped products covering ``groups`` (slot, first row, end row), one per window of at most
    ``GROUPED_MM_MAX_GROUPS`` slots that holds rows."""
    calls = []
    for first_slot in range(0, num_slots, GROUPED_MM_MAX_GROUPS):
        end_slot = min(first_slot + GROUPED_MM_MAX_GROUPS, num_slots)
        inside = [(slot, start, end) for slot, start, end in groups if first_slot <= slot < end_slot]
        if not inside:
            continue
        counts = [0] * (end_slot - first_slot)
        for slot, start, end in inside:
            counts[slot - first_slot] = end - start
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)
        calls.append(GroupedCall(inside[0][1], inside[-1][2], first_slot, end_slot, offsets))
    return calls


def project(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
             groups: Sequence[tuple[int, int, int]], calls: list[GroupedCall] | None, transposed: bool,
             batched: bool) -> torch.Tensor:
    """One projection of every row by its slot's weight: x [R, in], weights [S, ...] -> [R, out]."""
    x = x.to(weights.dtype)
    if batched:
        w = weights[slots]  # [R, out, in] (or [R, in, out])
        out = (torch.bmm(x.unsqueeze(1), w).squeeze(1) if transposed
               else torch.bmm(w, x.unsqueeze(-1)).squeeze(-1))  # [R, out]
    elif calls is not None:
        w = weights if transposed else weights.transpose(-2, -1)  # [S, in, out]
        mm = grouped_mm_fn()
        parts = [mm(x[c.first_row:c.end_row], w[c.first_slot:c.end_slot], offs=c.offsets) for c in calls]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [R, out]
    else:
        out = torch.cat([_linear(x[start:end], weights[slot], transposed) for slot, start, end in groups])
    if bias is not None:
        out = out + bias[slots]
    return out


def grouped_on_device(x: torch.Tensor, layout: ExpertLayout) -> bool:
    """Whether the grouped kernel runs as torch's grouped product here (else a loop over the groups)."""
    return x.is_cuda and layout.dtype == torch.bfloat16 and grouped_mm_fn() is not None


def expert_rows(module: nn.Module, layout: ExpertLayout, views: dict[str, torch.Tensor], x: torch.Tensor,
                slots: torch.Tensor, groups: Sequence[tuple[int, int, int]] | None, kernel: Kernel) -> torch.Tensor:
    """Each row of ``x`` [R, H] through its expert held in slot ``slots[r]``: returns [R, H].

    ``groups`` lists (slot, first row, end row) of the slot-sorted rows; None: the grouped kernel finds them
    from ``slots`` (sorted) on the device where torch's grouped product runs and the pool has at most
    ``GROUPED_MM_MAX_GROUPS`` slots (one call; the graph engine's prefill; no host sync where that product is
    one kernel, as on Hopper: elsewhere torch loops over the groups and reads their ends), else from the host.
    """
    batched = kernel is Kernel.BATCHED
    num_slots = views["gate_up_proj"].shape[0]
    calls = None
    if groups is None and kernel is not Kernel.BATCHED:
        counts = torch.zeros(num_slots, dtype=torch.int64, device=x.device)
        counts.index_add_(0, slots, torch.ones_like(slots))  # bincount would sync to size its output
        if grouped_on_device(x, layout) and kernel is Kernel.GROUPED and num_slots <= GROUPED_MM_MAX_GROUPS:
            calls = [GroupedCall(0, x.shape[0], 0, num_slots, counts.cumsum(0, dtype=torch.int32))]
        else:
            groups, end = [], 0
            for slot, n in enumerate(counts.tolist()):  # one read of the counts
                if n:
                    groups.append((slot, end, end + n))
                    end += n
    elif kernel is Kernel.GROUPED and grouped_on_device(x, layout):
        calls = grouped_calls(groups, num_slots, x.device)
    bias = views.get("gate_up_proj_bias")
    h = project(x, views["gate_up_proj"], bias, slots, groups, calls, layout.is_transposed, batched)  # [R, 2I]
    h = module._apply_gate(h)  # [R, I]; the model's own gate (GPT-OSS: interleaved, clamped)
    bias = views.get("down_proj_bias")
    return project(h, views["down_proj"], bias, slots, groups, calls, layout.is_transposed, batched)  # [R, H]


def sum_over_k(out: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, H] weighted rows -> [T, H]: the reduction of transformers' grouped and batched experts, a sum
    over k in the rows' dtype, then a cast to ``dtype``."""
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(dtype)


def weighted_rows(module: nn.Module, layout: ExpertLayout, views: dict[str, torch.Tensor], kernel: Kernel,
                  hidden_states: torch.Tensor, flat_ids: torch.Tensor, weights: torch.Tensor, counts: dict[int, int],
                  chunk: Sequence[int], slots: Sequence[int], out: torch.Tensor) -> None:
    """Write into ``out`` [T*k, H] the weighted rows of every (token, expert) pair whose expert is in
    ``chunk`` (held in ``slots``, same order); ``counts[e]``: the pairs routed to e. No host sync.

    hidden_states [T, H], flat_ids / weights [T*k] token-major.
    """
    num_slots = views["gate_up_proj"].shape[0]
    # lut[e] = slot of e, or num_slots for experts outside the chunk: sorting by it puts this chunk's rows
    # first, grouped by slot, without another sync.
    lut = [num_slots] * layout.num_experts
    for expert, slot in zip(chunk, slots):
        lut[expert] = slot
    rows_total, groups = 0, []
    for slot, expert in sorted(zip(slots, chunk)):
        groups.append((slot, rows_total, rows_total + counts[expert]))
        rows_total += counts[expert]
    row_slots = torch.tensor(lut).to(hidden_states.device, non_blocking=True)[flat_ids]  # [T*k]
    write_weighted_rows(module, layout, views, kernel, hidden_states, row_slots, weights, groups, rows_total, out)


def weighted_rows_out(layout: ExpertLayout, hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An empty [T*k, H] for the weighted rows of ``weights`` [T*k], in the dtype transformers' experts weigh
    them in (the experts' dtype promoted with the routing weights')."""
    dtype = torch.promote_types(layout.dtype, weights.dtype)
    return torch.empty(weights.shape[0], hidden_states.shape[-1], dtype=dtype, device=hidden_states.device)


def write_weighted_rows(module: nn.Module, layout: ExpertLayout, views: dict[str, torch.Tensor], kernel: Kernel,
                        hidden_states: torch.Tensor, row_slots: torch.Tensor, weights: torch.Tensor,
                        groups: Sequence[tuple[int, int, int]] | None, rows: int, out: torch.Tensor) -> None:
    """Write into ``out`` [T*k, H] the weighted rows of the ``rows`` pairs first in slot order (``row_slots``
    [T*k] the slot of each pair; a stable sort, so a slot's rows stay in pair order); ``groups`` as
    ``expert_rows`` takes them. No host sync."""
    top_k = row_slots.shape[0] // hidden_states.shape[0]
    order = torch.argsort(row_slots, stable=True)[:rows]  # [R] pair indices, by slot
    y = expert_rows(module, layout, views, hidden_states[order // top_k], row_slots[order], groups, kernel)  # [R, H]
    out.index_copy_(0, order, y * weights[order].unsqueeze(-1))
