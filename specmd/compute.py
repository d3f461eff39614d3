"""Expert compute on the slot pool, with the model's own gate function and the same kernels as transformers.

Legend: R routed (token, expert) rows of one chunk, H hidden, I expert intermediate, S slots.
Rows arrive sorted by slot, so each slot's rows are contiguous (``groups``) as grouped kernels need.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import ExpertLayout

# Up to this many rows, gather the rows' weights and use batched products (what transformers' generate
# switches to for decode: faster than grouped products for a token or two, DESIGN.md section 2).
GATHER_MAX_ROWS = 16
# torch._grouped_mm refuses more groups than this ("Can't process more than 1024 groups").
GROUPED_MM_MAX_GROUPS = 1024


def _grouped_mm_fn():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _linear(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    # w: [out, in], or [in, out] when transposed
    return x @ w if transposed else x @ w.transpose(-2, -1)


def _project(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
             groups: Sequence[tuple[int, int, int]], offsets: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One projection of every row by its slot's weight: x [R, in], weights [S, ...] -> [R, out]."""
    x = x.to(weights.dtype)
    if x.shape[0] <= GATHER_MAX_ROWS:
        w = weights[slots]  # [R, out, in] (or [R, in, out])
        out = (torch.bmm(x.unsqueeze(1), w).squeeze(1) if transposed
               else torch.bmm(w, x.unsqueeze(-1)).squeeze(-1))  # [R, out]
    elif offsets is not None:
        w = weights if transposed else weights.transpose(-2, -1)  # [S, in, out]
        out = _grouped_mm_fn()(x, w, offs=offsets)  # [R, out]
    else:
        out = torch.cat([_linear(x[start:end], weights[slot], transposed) for slot, start, end in groups])
    if bias is not None:
        out = out + bias[slots]
    return out


def expert_rows(module: nn.Module, layout: ExpertLayout, views: dict[str, torch.Tensor], x: torch.Tensor,
                slots: torch.Tensor, groups: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Each row of ``x`` [R, H] through its expert held in slot ``slots[r]``: returns [R, H].

    ``groups`` lists (slot, first row, end row) of the slot-sorted rows.
    """
    num_slots = views["gate_up_proj"].shape[0]
    offsets = None
    if (x.is_cuda and layout.dtype == torch.bfloat16 and _grouped_mm_fn() is not None
            and x.shape[0] > GATHER_MAX_ROWS and num_slots <= GROUPED_MM_MAX_GROUPS):
        counts = [0] * num_slots
        for slot, start, end in groups:
            counts[slot] = end - start
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device, non_blocking=True)
    bias = views.get("gate_up_proj_bias")
    h = _project(x, views["gate_up_proj"], bias, slots, groups, offsets, layout.is_transposed)  # [R, 2I]
    h = module._apply_gate(h)  # [R, I]; the model's own gate (GPT-OSS: interleaved, clamped)
    bias = views.get("down_proj_bias")
    return _project(h, views["down_proj"], bias, slots, groups, offsets, layout.is_transposed)  # [R, H]
