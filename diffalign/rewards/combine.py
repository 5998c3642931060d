"""Combining reward heads, in one place: a weighted sum, Pareto dominance, and pairs drawn from scores.

``diffalign score`` and ``make-pairs`` (weighted sums, best-vs-worst / all / Pareto pairs), D3PO's rounds (Pareto
pairs among one prompt's samples) and the online objectives to come all use these. Scores are per head; a head
whose ``higher_is_better`` is False counts negatively (its sign is flipped before comparing or summing).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

PAIRINGS = ("best-worst", "all", "pareto", "thumbs")  # thumbs: unpaired labels (thumbs_from_scores)


def directions(rewards: Mapping) -> dict[str, bool]:
    """``{head: higher_is_better}`` of named reward heads (what :func:`combine` reads)."""
    return {name: r.higher_is_better for name, r in rewards.items()}


def signed(scores: Tensor, higher_is_better: Sequence[bool] | None = None) -> Tensor:
    """``scores`` [..., H] with lower-is-better heads negated, so that higher is better on every head."""
    signs = torch.tensor([1.0 if h else -1.0 for h in (higher_is_better or [True] * scores.shape[-1])])
    return scores * signs.to(scores.device, scores.dtype if scores.is_floating_point() else torch.float32)


def weighted(scores: Tensor, higher_is_better: Sequence[bool], weights: Sequence[float] | None = None) -> Tensor:
    """Σ w_i · s_i over the heads of ``scores`` [N, H] (w_i negated for lower-is-better heads), in the scores'
    dtype and device, differentiable; one head alone keeps its own scale."""
    weights = list(weights) if weights is not None else [1.0] * scores.shape[-1]
    if len(weights) != scores.shape[-1]:
        raise ValueError(f"{scores.shape[-1]} reward(s) but {len(weights)} weight(s)")
    w = torch.tensor(weights, dtype=scores.dtype, device=scores.device)
    return (signed(scores, higher_is_better).to(scores.dtype) * w).sum(dim=-1)


def combine(scores: Mapping[str, Sequence[float]], higher_is_better: Mapping[str, bool],
            weights: Sequence[float] | None = None) -> list[float]:
    """:func:`weighted` of per-head score lists (``{head: [score per image]}``), as a list (float64)."""
    names = list(scores)
    table = torch.tensor([list(scores[n]) for n in names], dtype=torch.float64).T  # [N, H]
    return weighted(table, [higher_is_better.get(n, True) for n in names], weights).tolist()


def pareto_dominates(a: Tensor, b: Tensor) -> bool:
    """True if score vector ``a`` is >= ``b`` on every reward and > on at least one (higher is better)."""
    return bool((a >= b).all() and (a > b).any())


def pareto_preference(a: Tensor, b: Tensor) -> int:
    """1 if ``a`` dominates ``b``, -1 if ``b`` dominates ``a``, 0 for a tie (no pair, no gradient)."""
    return 1 if pareto_dominates(a, b) else -1 if pareto_dominates(b, a) else 0


def pairs_from_scores(scores: Tensor, pairing: str = "pareto", combined: Sequence[float] | None = None,
                      margin: float = 0.0) -> list[tuple[int, int]]:
    """``(winner, loser)`` indices among one prompt's K samples, from signed scores [K, H] (see :func:`signed`).

    ``pareto``: every ordered pair where the winner is at least as good on every head and better on one (ties and
    trade-offs give no pair; with one head: simply higher); ``best-worst``: the best against the worst by the
    ``combined`` score, if they differ by more than ``margin``; ``all``: every ordered pair more than ``margin``
    apart by ``combined``."""
    k = scores.shape[0]
    if pairing == "pareto":
        return [(i, j) for i, j in itertools.permutations(range(k), 2) if pareto_dominates(scores[i], scores[j])]
    if pairing not in PAIRINGS or pairing == "thumbs":
        raise ValueError(f"pairing {pairing!r}: choose one of best-worst, all, pareto")
    c = list(combined) if combined is not None else scores.sum(dim=-1).tolist()
    if pairing == "best-worst":
        best, worst = max(range(k), key=c.__getitem__), min(range(k), key=c.__getitem__)
        return [(best, worst)] if c[best] - c[worst] > margin else []
    return [(i, j) for i, j in itertools.permutations(range(k), 2) if c[i] - c[j] > margin]


def thumbs_from_scores(combined: Sequence[float], margin: float = 0.0) -> list[tuple[int, int]]:
    """Unpaired labels ``(index, label)`` among one prompt's K samples by their combined score: 1 (desirable) above
    the prompt's median by more than ``margin``, 0 below it by more than ``margin``; the rest (the middle image of
    an odd K, ties at the median, anything within the margin) get no label."""
    c = sorted(combined)
    k = len(c)
    median = c[k // 2] if k % 2 else (c[k // 2 - 1] + c[k // 2]) / 2
    return [(i, int(s > median)) for i, s in enumerate(combined) if abs(s - median) > margin]
