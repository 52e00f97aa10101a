"""Pareto math: dominance, the non-dominated subset and exact hypervolumes, against known answers."""

import itertools
import random

import pytest

from search.pareto import dominates, hypervolume, hypervolume_2d, non_dominated


def test_dominates():
    assert dominates((1, 2), (2, 2))
    assert dominates((1, 1), (2, 2))
    assert not dominates((2, 2), (2, 2))  # equal points do not dominate each other
    assert not dominates((1, 3), (2, 2)) and not dominates((2, 2), (1, 3))
    assert not dominates((2, 2), (1, 2))
    with pytest.raises(ValueError):
        dominates((1, 2), (1, 2, 3))


def test_non_dominated_known_answer():
    points = [(1, 5), (2, 2), (3, 1), (3, 3), (2, 2), (5, 5), (0.5, 9)]
    # (3,3) is dominated by (2,2), (5,5) by everything; the second (2,2) is a duplicate of index 1.
    assert non_dominated(points) == [0, 1, 2, 6]
    assert non_dominated([]) == []
    assert non_dominated([(1.0, 1.0, 1.0)]) == [0]
    assert non_dominated([(1, 2, 3), (1, 2, 3), (0, 5, 3)]) == [0, 2]


def test_non_dominated_refuses_nan_and_mixed_dimensions():
    with pytest.raises(ValueError):
        non_dominated([(1, 2), (1, float("nan"))])
    with pytest.raises(ValueError):
        non_dominated([(1, 2), (1, 2, 3)])


def test_hypervolume_2d_staircase():
    # Columns: x 1..2 has height 4-3, x 2..3 height 4-2, x 3..4 height 4-1: 1 + 2 + 3.
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1)], (4, 4)) == 6.0
    # Dominated points, duplicates and points outside the reference box add nothing.
    assert hypervolume_2d([(3, 1), (2, 2), (1, 3), (2.5, 2.5), (2, 2), (5, 0), (4, 0), (0, 4)], (4, 4)) == 6.0
    assert hypervolume_2d([], (4, 4)) == 0.0
    assert hypervolume_2d([(0.5, 0.25)], (1.0, 1.0)) == pytest.approx(0.375)


def test_hypervolume_known_answers():
    assert hypervolume([(3,), (1,)], (5,)) == 4.0
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (4, 4)) == 6.0
    assert hypervolume([(0, 0, 0)], (1, 2, 3)) == 6.0
    # Boxes [0,2]x[0,2]x[1,2] (4) and [1,2]x[1,2]x[0,2] (2) overlap in [1,2]^3 (1).
    assert hypervolume([(0, 0, 1), (1, 1, 0)], (2, 2, 2)) == 5.0
    assert hypervolume([(0, 0, 1), (1, 1, 0), (1, 1, 1), (3, 0, 0)], (2, 2, 2)) == 5.0


def union_of_boxes(points, reference):
    """Inclusion-exclusion over every subset: exact, exponential, independent of the slicing code."""
    inside = [p for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    total = 0.0
    for size in range(1, len(inside) + 1):
        for subset in itertools.combinations(inside, size):
            corner = [max(c) for c in zip(*subset, strict=True)]
            volume = 1.0
            for c, r in zip(corner, reference, strict=True):
                volume *= r - c
            total += (-1) ** (size + 1) * volume
    return total


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(dims):
    rng = random.Random(dims)
    reference = (1.0,) * dims
    for _ in range(30):
        points = [tuple(rng.choice([rng.random(), 0.5, 1.2]) for _ in range(dims)) for _ in range(rng.randint(1, 7))]
        assert hypervolume(points, reference) == pytest.approx(union_of_boxes(points, reference), abs=1e-12)
        if dims == 2:
            assert hypervolume_2d(points, reference) == pytest.approx(union_of_boxes(points, reference), abs=1e-12)


def test_hypervolume_grows_when_the_front_improves():
    front = [(0.2, 0.8), (0.5, 0.5), (0.8, 0.2)]
    better = front + [(0.4, 0.4)]
    assert hypervolume(better, (1, 1)) > hypervolume(front, (1, 1))


def test_hypervolume_refuses_bad_input():
    with pytest.raises(ValueError):
        hypervolume_2d([(1, 2, 3)], (4, 4, 4))
    with pytest.raises(ValueError):
        hypervolume([(1, 2)], (4, 4, 4))
    with pytest.raises(ValueError):
        hypervolume([(1, 2)], ())
    with pytest.raises(ValueError):
        hypervolume([(1, float("nan"))], (4, 4))
