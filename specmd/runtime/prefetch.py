"""Speculative routing: the next layers' routers score the current hidden state; a policy picks experts.

Legend: T tokens, H hidden, E experts, D lookahead depth, C candidates per looked-ahead layer.
Scores of a batch are the routers' probabilities averaged over its tokens, so a long prefill predicts
the experts most of its tokens want rather than the union of all (which would be every expert).
("Speculating Experts Accelerates Inference for MoE", arXiv 2603.19289: next-layer gates on the current
hidden state predict the routed experts well.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

PREFETCH_POLICIES = ("none", "topk", "top-p", "threshold")


class PrefetchRequest(NamedTuple):
    """Load ``key`` (layer, expert) before absolute position ``target`` (pass * layers + layer) runs; it was
    predicted ``distance`` layers ahead of the layer that asked."""

    distance: int
    target: int
    key: tuple[int, int]


def nearest_first(requests) -> list[PrefetchRequest]:
    """The one order prefetches are issued in, by every caller: nearest looked-ahead layer first, then the
    order of submission (the predictor's rank within a layer). A nearer layer runs sooner, so its copy has
    the least time left to arrive."""
    return sorted(requests, key=lambda request: request.distance)


def prefetch_requests(position: int, predicted: list[tuple[int, list[int]]]) -> list[PrefetchRequest]:
    """Requests for ``predicted``: (target layer, ids) of the looked-ahead layers, nearest first, asked by
    the layer at absolute ``position``."""
    return [PrefetchRequest(distance, position + distance, (target, expert))
            for distance, (target, ids) in enumerate(predicted, start=1) for expert in ids]


@dataclass(frozen=True)
class PrefetchConfig:
    """``policy``: none | topk | top-p | threshold; ``lookahead`` d in 1..3; ``k`` (topk; None = the model's
    top-k); ``p`` and ``cap`` (top-p: smallest set reaching p, at most cap); ``tau`` (threshold);
    ``inline``: issue prefetches on the model's thread right after the layer's demand loads instead of on
    the watchdog thread: deterministic, for experiments and for checking the simulator.
    ``max_inflight``: prefetch copies queued on the device at once (None = the model's top-k); the
    watchdog waits for one to finish before issuing more, so a demand copy never queues behind a
    long run of speculative ones and predictions for layers that already ran are dropped unsent.
    ``gather_programs`` (graph engine, CUDA): the programs a prefetch gather runs on, so the layer's compute
    beside it keeps the other SMs (None = a quarter of the device's SMs; 0 = the demand gather's full grid)."""

    policy: str = "none"
    lookahead: int = 1
    k: int | None = None
    p: float = 0.9
    cap: int | None = None
    tau: float = 0.05
    inline: bool = False
    max_inflight: int | None = None
    gather_programs: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in PREFETCH_POLICIES:
            raise ValueError(f"unknown prefetch policy {self.policy!r}; choose one of: {', '.join(PREFETCH_POLICIES)}")
        if not 1 <= self.lookahead <= 3:
            raise ValueError(f"prefetch lookahead={self.lookahead}: must be 1, 2 or 3")
        if self.k is not None and self.k < 1:
            raise ValueError(f"prefetch k={self.k}: must be at least 1 (or None for the model's top-k)")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"prefetch max_inflight={self.max_inflight}: must be at least 1 (or None for the "
                             "model's top-k)")
        if self.gather_programs is not None and (not isinstance(self.gather_programs, int)
                                                 or isinstance(self.gather_programs, bool) or self.gather_programs < 0):
            raise ValueError(f"prefetch gather_programs={self.gather_programs!r}: must be an integer >= 0 (0: the full "
                             "grid; None: a quarter of the device's SMs)")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"prefetch p={self.p}: must be in (0, 1]")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"prefetch tau={self.tau}: must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


class Predictor:
    """Turns the current layer's hidden states into predicted expert ids for the next ``lookahead`` layers."""

    def __init__(self, config: PrefetchConfig, routers: list[nn.Module | None], top_k: int) -> None:
        if config.enabled and any(r is None for r in routers):
            raise ValueError("prefetch needs each MoE layer's router (a 'gate' or 'router' beside the experts); "
                             "this model has none: use prefetch='none'")
        self.config = config
        self.routers = routers
        self.top_k = top_k
        num_experts = routers[0].weight.shape[0] if routers and routers[0] is not None else 0
        k = config.k or top_k
        self.candidates = min(num_experts, {"topk": k, "top-p": config.cap or 2 * top_k,
                                            "threshold": config.cap or 2 * top_k}.get(config.policy, 0))
        n = len(routers)
        depth = min(config.lookahead, n)  # beyond n the same layers would repeat
        # Fixed per layer, read several times per layer on the hot path: computed once.
        self._targets = [[(layer + j) % n for j in range(1, depth + 1)] if config.enabled else []
                         for layer in range(n)]
        # layer -> (signature of the routers ahead of it, their weights, biases), for lookahead > 1
        self._stacked: dict[int, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def targets(self, layer: int) -> list[int]:
        """The (cyclic) MoE layers predicted from ``layer``, nearest first: the last layer predicts the
        next pass's first layers."""
        return self._targets[layer]

    def scores(self, layer: int, hidden_states: torch.Tensor, candidates: int,
               stacked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """([D, C] ids, [D, C] probabilities) of the ``candidates`` best experts of each looked-ahead layer,
        best first, on the device. No sync."""
        logits = self._logits(layer, hidden_states, stacked)  # [T, D, E]
        top, top_ids = logits.float().softmax(-1).mean(0).topk(candidates, dim=-1)  # [D, C]
        return top_ids, top

    def predict(self, layer: int, hidden_states: torch.Tensor, stacked: bool = True) -> torch.Tensor | None:
        """[D, C] predicted ids (-1 where the policy keeps fewer than C) on the device, or None. No sync.
        ``stacked=False``: one product per looked-ahead router instead of one over their weights concatenated
        (cached, and checked against the routers on every call): what a traced step needs, since torch.compile
        would guard on that check and recompile."""
        if not self.targets(layer):
            return None
        if self.config.policy == "topk" and hidden_states.shape[0] == 1:
            # One token (decode): softmax is monotonic, so the best logits are the best probabilities;
            # two launches instead of five, on the model's thread, every layer of every step.
            return self._logits(layer, hidden_states, stacked)[0].topk(self.candidates, dim=-1).indices
        ids, top = self.scores(layer, hidden_states, self.candidates, stacked)  # [D, C]
        if self.config.policy == "top-p":
            # keep the smallest prefix whose mass reaches p: an id stays if the mass before it is < p
            ids = torch.where((top.cumsum(-1) - top) < self.config.p, ids, -1)
        elif self.config.policy == "threshold":
            ids = torch.where(top > self.config.tau, ids, -1)
        return ids

    def _logits(self, layer: int, hidden_states: torch.Tensor, stacked: bool = True) -> torch.Tensor:
        """[T, D, E] router logits of every looked-ahead layer, in one product (``stacked``) or one each."""
        if not stacked:
            routers = [self.routers[t] for t in self.targets(layer)]
            return torch.stack([F.linear(hidden_states.to(r.weight.dtype), r.weight, getattr(r, "bias", None))
                                for r in routers], dim=1)
        weight, bias = self._stacked_router(layer, hidden_states.device)
        logits = F.linear(hidden_states.to(weight.dtype), weight, bias)  # [T, D*E]
        return logits.view(hidden_states.shape[0], -1, weight.shape[0] // len(self.targets(layer)))

    def _stacked_router(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The looked-ahead routers' weights [D*E, H] (and biases) concatenated, built on first use (the
        routers reach the device after the predictor is made) and again when a router's weight changes
        (moved, replaced, or written in place)."""
        routers = [self.routers[t] for t in self.targets(layer)]
        if len(routers) == 1:  # the router's own tensors: nothing copied, never stale
            return routers[0].weight, getattr(routers[0], "bias", None)
        signature = tuple((r.weight.data_ptr(), _version(r.weight), _version(getattr(r, "bias", None)))
                          for r in routers)
        cached = self._stacked.get(layer)
        if cached is not None and cached[0] == signature and cached[1].device == device:
            return cached[1], cached[2]
        # Plain tensors even under inference_mode, so a later forward with autograd on can use them.
        with torch.inference_mode(False), torch.no_grad():
            biases = [getattr(r, "bias", None) for r in routers]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else r.weight.new_zeros(r.weight.shape[0])
                                  for b, r in zip(biases, routers)])
            weight = torch.cat([r.weight for r in routers])
        self._stacked[layer] = signature, weight, bias
        return weight, bias


def _version(tensor: torch.Tensor | None) -> int | None:
    """In-place write counter of ``tensor`` (None for none, and for inference tensors, which keep none)."""
    if tensor is None or tensor.is_inference():
        return None
    return tensor._version
