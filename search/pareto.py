"""Pareto math over points given as sequences of floats; every objective is minimised.

Pure functions, no state: dominance, the non-dominated subset, and the exact hypervolume (the volume a set of
points dominates inside a reference box), which grows whenever a front improves anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """True when `a` is no worse than `b` in every objective and strictly better in at least one.

    Raises:
        ValueError: the points have different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"points of different dimension: {list(a)} and {list(b)}")
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated(points: Sequence[Point]) -> list[int]:
    """Indices, ascending, of the points that no other point dominates.

    Equal points do not dominate each other; of a group of equal non-dominated points only the first index
    is returned, so the answer holds each front position once.

    Raises:
        ValueError: the points differ in dimension or hold NaN.
    """
    _check(points)
    front: list[int] = []
    kept: set[tuple[float, ...]] = set()
    for i, p in enumerate(points):
        if tuple(p) in kept or any(dominates(q, p) for q in points):
            continue
        kept.add(tuple(p))
        front.append(i)
    return front


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """Exact area dominated by two-objective `points` and bounded by `reference`.

    Points that are not strictly better than `reference` in both objectives add nothing. O(n log n).

    Raises:
        ValueError: a point or the reference is not two-dimensional, or holds NaN.
    """
    if len(reference) != 2:
        raise ValueError(f"hypervolume_2d needs a 2-d reference, got {list(reference)}")
    _check(points, reference)
    inside = sorted((p[0], p[1]) for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, ceiling = 0.0, reference[1]
    for i, (x, y) in enumerate(inside):
        ceiling = min(ceiling, y)
        right = inside[i + 1][0] if i + 1 < len(inside) else reference[0]
        area += (right - x) * (reference[1] - ceiling)
    return area


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Exact volume dominated by `points` and bounded by `reference`, in any dimension >= 1.

    Slices along the last objective and sums slab volumes of the (d-1)-dimensional hypervolumes, down to
    the 2-d sweep: O(n^(d-1) log n), fine for the few objectives and small fronts of a job.

    Raises:
        ValueError: dimensions differ, the reference is empty, or a value is NaN.
    """
    if len(reference) < 1:
        raise ValueError("hypervolume needs a reference point of dimension >= 1")
    _check(points, reference)
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    return _volume(inside, tuple(reference))


def _volume(points: list[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in points)
    if len(reference) == 2:
        return hypervolume_2d(points, reference)
    levels = sorted({p[-1] for p in points}) + [reference[-1]]
    volume = 0.0
    for low, high in zip(levels, levels[1:], strict=False):
        below = [p[:-1] for p in points if p[-1] <= low]
        volume += (high - low) * _volume(below, reference[:-1])
    return volume


def _check(points: Sequence[Point], reference: Point | None = None) -> None:
    sizes = {len(p) for p in points} | ({len(reference)} if reference is not None else set())
    if len(sizes) > 1:
        raise ValueError(f"points and reference differ in dimension: {sorted(sizes)}")
    values = [x for p in points for x in p] + list(reference or [])
    if any(math.isnan(x) for x in values):
        raise ValueError("NaN in points or reference")
