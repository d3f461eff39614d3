"""The miss gather: copy a layer's missed experts from the pinned host store into their device slots, by a
kernel that reads host memory directly (unified addressing), on a static grid so it can be captured in a
CUDA graph.

Grid: (K misses at most, pieces of one expert's block). Program (j, p) copies piece p of expert
``experts[j]`` into slot ``slots[j]`` when j < ``count[0]``; the other programs return at once. The count
and the ids are read on the device, so the host never learns how many experts missed. Blocks are moved as
32-bit words (every expert block is a multiple of 64 elements, see ``adapters._ALIGN_ELEMENTS``).
Measured on the H100 (issue 11): 50.7 GB/s gathering 8 OLMoE experts, against 53.9 GB/s for the copy engine.

``programs``: the same copies by that many programs, each looping over pieces (``_gather_strided``). A
prefetch gather runs beside the layer's compute; on the full grid its thousands of programs take every SM
until they drain, and the compute waits for them. Bounded, they leave the other SMs to the compute.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS_PER_PROGRAM = 8192  # 32 KiB per program


@triton.jit
def _copy_piece(store, pool, experts, slots, j, piece, words_per_expert, WORDS: tl.constexpr):
    """Piece ``piece`` of expert ``experts[j]``'s block into slot ``slots[j]``."""
    expert = tl.load(experts + j).to(tl.int64)
    slot = tl.load(slots + j).to(tl.int64)
    offsets = piece * WORDS + tl.arange(0, WORDS)
    inside = offsets < words_per_expert
    words = tl.load(store + expert * words_per_expert + offsets, mask=inside)
    tl.store(pool + slot * words_per_expert + offsets, words, mask=inside)


@triton.jit
def _gather(store, pool, experts, slots, count, words_per_expert, WORDS: tl.constexpr):
    j = tl.program_id(0)
    if j < tl.load(count):
        _copy_piece(store, pool, experts, slots, j, tl.program_id(1), words_per_expert, WORDS)


@triton.jit
def _gather_strided(store, pool, experts, slots, count, width, words_per_expert, pieces, WORDS: tl.constexpr,
                    PROGRAMS: tl.constexpr):
    total = tl.minimum(tl.load(count).to(tl.int64), width) * pieces  # the full grid reads K entries at most
    for item in range(tl.program_id(0), total, PROGRAMS):
        _copy_piece(store, pool, experts, slots, item // pieces, item % pieces, words_per_expert, WORDS)


def gather_misses(store: torch.Tensor, pool: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor,
                  count: torch.Tensor, programs: int = 0) -> None:
    """``pool[slots[j]] = store[experts[j]]`` for j < ``count`` on the current stream. ``store`` [E, words]
    int32: pinned host memory seen as a CUDA tensor (``specmd.runtime.gather.host_words``); ``pool`` [S, words]
    int32 on the device; ``experts``/``slots`` [K] int64 and ``count`` [] on the device. Launches one kernel;
    never syncs; traceable by torch.compile (a user Triton kernel). ``programs`` > 0: at most that many
    programs (SMs busy at once), each copying every ``programs``-th piece."""
    per_expert = store.shape[1]
    pieces = triton.cdiv(per_expert, WORDS_PER_PROGRAM)
    if programs > 0:
        _gather_strided[(programs,)](store, pool, experts, slots, count.reshape(1), experts.shape[0], per_expert,
                                     pieces, WORDS=WORDS_PER_PROGRAM, PROGRAMS=programs)
        return
    grid = (experts.shape[0], pieces)
    _gather[grid](store, pool, experts, slots, count.reshape(1), per_expert, WORDS=WORDS_PER_PROGRAM)
