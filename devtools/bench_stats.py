"""Goals of the benchmarks, judged with a bootstrap 95% interval (issue 20).

A goal is "met" when the whole interval clears it, "not met" when the whole
interval misses it, "inconclusive" otherwise: a median of a few noisy runs
says nothing either way when its interval straddles the goal.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    below = int(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def bootstrap(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., float],
    resamples: int = RESAMPLES,
    seed: int = 20,
) -> Interval:
    """The statistic of the samples (one sequence per argument of
    `statistic`, each resampled with replacement on its own) and its
    percentile 95% interval."""
    if any(len(s) == 0 for s in samples):
        raise ValueError("every sample needs at least one value")
    rng = random.Random(seed)
    estimate = statistic(*samples)
    draws = sorted(statistic(*(rng.choices(s, k=len(s)) for s in samples)) for _ in range(resamples))
    return Interval(estimate, percentile(draws, 2.5), percentile(draws, 97.5))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def at_most(interval: Interval, goal: float) -> str:
    """The verdict on "the statistic is at most `goal`"."""
    if interval.high <= goal:
        return "met"
    if interval.low > goal:
        return "not met"
    return "inconclusive"


def at_least(interval: Interval, goal: float) -> str:
    """The verdict on "the statistic is at least `goal`"."""
    if interval.low >= goal:
        return "met"
    if interval.high < goal:
        return "not met"
    return "inconclusive"
