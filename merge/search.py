"""Merge-weight search on the simplex within a budget of evaluations (deterministic for a given seed).

Score = (mean recovery, W_τ): higher mean recovery wins, W_τ breaks ties. The budget is spent as:
1. the start point (the user's weights, else uniform), then Dirichlet(1) samples — half the budget,
   a coarse look at the whole simplex;
2. local refinement from the best point so far: move `step` of weight from member i to member j,
   for every ordered pair in turn; an improving move is kept (and tried again from there), a full
   round of pairs without improvement halves the step (start 0.25).
Points are rounded to 1e-6 and never evaluated twice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from xmerge.errors import XmergeError

ROUND = 6
MIN_STEP = 1e-3


@dataclass(frozen=True, order=True)
class Score:
    mean_recovery: float
    w_tau: float


@dataclass(frozen=True)
class Trial:
    weights: tuple[float, ...]
    score: Score
    phase: str  # "start", "sample" or "refine"


@dataclass(frozen=True)
class SearchResult:
    best: Trial
    trace: list[Trial]

    def report(self) -> dict:
        """JSON-ready trace for the operation report."""
        return {
            "evaluations": len(self.trace),
            "best": {"weights": list(self.best.weights), "mean_recovery": self.best.score.mean_recovery,
                     "w_tau": self.best.score.w_tau},
            "trace": [{"weights": list(t.weights), "mean_recovery": t.score.mean_recovery, "w_tau": t.score.w_tau,
                       "phase": t.phase} for t in self.trace],
        }


def search_weights(score: Callable[[tuple[float, ...]], Score], n: int, budget: int, *,
                   start: Sequence[float] | None = None, seed: int = 0) -> SearchResult:
    """Best weights (λ_i ≥ 0, Σλ = 1) of `n` members found with at most `budget` calls of `score`."""
    check_search(n, budget)
    trace: list[Trial] = []
    seen: set[tuple[float, ...]] = set()

    def trial(weights: Sequence[float], phase: str) -> Trial | None:
        point = _on_simplex(weights)
        if point in seen or len(trace) >= budget:
            return None
        seen.add(point)
        trace.append(Trial(point, score(point), phase))
        return trace[-1]

    trial(start if start is not None else [1.0] * n, "start")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(4 * budget):  # bounded: duplicate samples are skipped, not counted
        if len(trace) >= max(1, budget // 2):
            break
        trial(_dirichlet_sample(n, generator), "sample")

    best = max(trace, key=lambda t: t.score)
    step = 0.25
    while len(trace) < budget and step >= MIN_STEP:
        improved = False
        for i, j in itertools.permutations(range(n), 2):
            moved = min(step, best.weights[i])
            if moved <= 0:
                continue
            weights = list(best.weights)
            weights[i] -= moved
            weights[j] += moved
            found = trial(weights, "refine")
            if found is not None and found.score > best.score:
                best, improved = found, True
            if len(trace) >= budget:
                break
        if not improved:
            step /= 2
    return SearchResult(best=max(trace, key=lambda t: t.score), trace=trace)


def check_search(n: int, budget: int) -> None:
    """XmergeError unless a search over `n` members with `budget` evaluations makes sense."""
    if n < 2:
        raise XmergeError(f"--search needs at least two members to weigh, got {n}")
    if budget < 1:
        raise XmergeError(f"--budget must be at least 1 evaluation, got {budget}")


def _dirichlet_sample(n: int, generator: torch.Generator) -> list[float]:
    # Dirichlet(1, ..., 1) = normalised Exp(1) draws, taken from the generator so the seed fixes them
    exponential = -torch.log1p(-torch.rand(n, generator=generator, dtype=torch.float64))
    return (exponential / exponential.sum()).tolist()


def _on_simplex(weights: Sequence[float]) -> tuple[float, ...]:
    if any(w < 0 or not math.isfinite(w) for w in weights) or not sum(weights) > 0:
        raise XmergeError(f"search weights must be finite, ≥ 0 and not all zero, got {list(weights)}")
    total = sum(weights)
    return tuple(round(w / total, ROUND) for w in weights)
