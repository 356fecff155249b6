"""Confidence intervals for the demo's accuracies: an accuracy measured on a few hundred held-out prompts is a
binomial proportion, and a difference of a few points between two arms can be noise. Pure arithmetic, no SciPy."""

from __future__ import annotations

import math

Z_95 = 1.96  # two-sided 95 % normal quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for `correct` successes in `total` trials. Unlike p +- z*sqrt(p(1-p)/n) it stays
    inside [0, 1] and does not shrink to a point at 0 % or 100 %, where the demo's collapsed arms and teachers sit."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in [0, total={total}], got {correct}")
    p, z2 = correct / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson interval of an accuracy that was computed as correct / total (the count is recovered by rounding)."""
    return wilson_interval(round(accuracy * total), total, z)


def gap_closed(accuracy: float, start: float, teacher: float) -> float | None:
    """(accuracy - start) / (teacher - start); None when the teacher is not better than the start."""
    return (accuracy - start) / (teacher - start) if teacher > start else None


def gap_closed_range(final: tuple[float, float], start: tuple[float, float],
                     teacher: float) -> tuple[float, float] | None:
    """The gap closed over every (final, start) pair inside their intervals, the teacher's accuracy taken as exact.

    (F - S) / (T - S) is monotone in F and in S separately, so its extremes over the box of the two intervals sit
    at its corners (for F <= T: low = F_low against S_high, high = F_high against S_low). Conservative: the two
    intervals are combined as a box, and start and final are measured on the same prompts (positively correlated).
    None when the start interval reaches the teacher (the ratio is unbounded there)."""
    (final_low, final_high), (start_low, start_high) = final, start
    if teacher <= start_high:
        return None
    corners = [(f - s) / (teacher - s) for f in (final_low, final_high) for s in (start_low, start_high)]
    return min(corners), max(corners)


def steps_to_close(evals: list[tuple[int, float]], start: float, teacher: float, fraction: float) -> int | None:
    """The first evaluated step whose accuracy closes at least `fraction` of the gap (point estimates); None if
    none does."""
    for step, accuracy in evals:
        closed = gap_closed(accuracy, start, teacher)
        if closed is not None and closed >= fraction:
            return step
    return None
