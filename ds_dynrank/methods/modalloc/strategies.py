"""Which modules train until the next event (DynaLoRA's allocators), as pure functions of importance scores.

Every function takes the module importances [M] and returns an active mask of M bools. Random strategies draw
from the `generator` they are given: rank 0 seeds it from (seed, step) and broadcasts the result, so no rank
ever draws on its own.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from ds_dynrank.methods.modalloc.config import Strategy

STRATEGIES = get_args(Strategy)


def normalise(importance_M: torch.Tensor) -> torch.Tensor:
    """ŷ = y / Σ y, fp64; uniform when nothing was measured yet (all zero)."""
    y = importance_M.double().clamp_min(0)
    total = y.sum()
    return torch.full_like(y, 1 / len(y)) if total <= 0 else y / total


def _mask(chosen: list[int], n: int) -> list[bool]:
    picked = set(chosen)
    return [m in picked for m in range(n)]


def topk(importance_M: torch.Tensor, k: int) -> list[bool]:
    """The k most important (ties: lower index first, so the result never depends on sort stability)."""
    order = sorted(range(len(importance_M)), key=lambda m: (-float(importance_M[m]), m))
    return _mask(order[:k], len(importance_M))


def threshold(importance_M: torch.Tensor, p: float) -> list[bool]:
    """LoRA-drop's rule: the smallest set of top modules whose normalised importance sums to >= p."""
    share = normalise(importance_M)
    order = sorted(range(len(share)), key=lambda m: (-float(share[m]), m))
    chosen, covered = [], 0.0
    for m in order:
        chosen.append(m)
        covered += float(share[m])
        if covered >= p - 1e-12:
            break
    return _mask(chosen, len(share))


def multinomial(importance_M: torch.Tensor, k: int, generator: torch.Generator) -> list[bool]:
    """k distinct modules drawn with probability proportional to importance (without replacement)."""
    chosen = torch.multinomial(normalise(importance_M), k, replacement=False, generator=generator)
    return _mask(chosen.tolist(), len(importance_M))


def discounted(
    importance_M: torch.Tensor, times_chosen_M: torch.Tensor, k: int, generator: torch.Generator
) -> list[bool]:
    """DynaLoRA's discounted sampling: weights ŷ / C, C = how often each module was already chosen, so modules
    that rarely trained get their turn."""
    weights = normalise(importance_M) / (times_chosen_M.double() + 1e-2)
    chosen = torch.multinomial(weights / weights.sum(), k, replacement=False, generator=generator)
    return _mask(chosen.tolist(), len(importance_M))


def uniform(n: int, k: int, generator: torch.Generator) -> list[bool]:
    """k modules uniformly at random: the control every importance score must beat."""
    return _mask(torch.randperm(n, generator=generator)[:k].tolist(), n)


def select(
    strategy: str,
    importance_M: torch.Tensor,
    *,
    k: int,
    p: float,
    times_chosen_M: torch.Tensor,
    generator: torch.Generator,
) -> list[bool]:
    """Dispatch by name (the config's `modalloc.strategy`)."""
    if strategy == "topk":
        return topk(importance_M, k)
    if strategy == "threshold":
        return threshold(importance_M, p)
    if strategy == "multinomial":
        return multinomial(importance_M, k, generator)
    if strategy == "discounted":
        return discounted(importance_M, times_chosen_M, k, generator)
    if strategy == "uniform":
        return uniform(len(importance_M), k, generator)
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def initial_size(strategy: str, n: int, *, k: int, p: float) -> int:
    """Active modules before any score exists: k, or for `threshold` the share p of the modules."""
    return max(1, math.ceil(p * n)) if strategy == "threshold" else k
