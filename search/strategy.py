"""The ask/tell interface every search strategy speaks, and the records it hands out and keeps.

A strategy never evaluates anything: `ask()` hands out requests (JSON-safe specs of candidates, never models),
`tell()` takes back their fitness (lower is better) or their failure. A driver can run many strategies side by
side, report and checkpoint between their rounds, and resume one from `state_dict()` after a restart: a
restored strategy hands out again the requests that had no result and then continues exactly as the
uninterrupted run would (optuna `BaseSampler`, Ray Tune `Searcher.suggest / on_trial_complete`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from search.genome import PruneGenome

R = TypeVar("R", covariant=True)
C = TypeVar("C")


class Strategy(Protocol[R]):
    """A search that proposes candidates and learns from their fitness.

    `R` is what `ask` hands out: a `Request` for the pruning strategies, a `KVRequest` for the KV search.
    """

    def ask(self, limit: int | None = None) -> list[R]:
        """Requests to evaluate now, at most `limit` (default: all that can be handed out now).

        Empty while results the strategy waits on are pending, and once it is finished.
        """
        ...

    def tell(self, candidate_id: str, fitness: float | None, error: str | None = None) -> None:
        """Record an asked request's fitness (lower is better); None, NaN or inf marks a failure.

        Raises:
            ValueError: `candidate_id` was not asked, or was told already.
        """
        ...

    @property
    def finished(self) -> bool:
        """Nothing more to ask and every request told."""
        ...

    @property
    def evaluations(self) -> int:
        """Results told so far, failures included."""
        ...

    @property
    def rounds(self) -> int:
        """Rounds completed: a round (an evolution's generation) is when a driver reports and checkpoints."""
        ...

    @property
    def best(self):
        """The best candidate so far (the start until something succeeded)."""
        ...

    @property
    def best_fitness(self) -> float | None:
        """The best candidate's fitness; None before anything succeeded."""
        ...

    def state_dict(self) -> dict:
        """Everything a restart needs, as JSON-safe data."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` output; the strategy must be freshly built with the same arguments.

        Raises:
            ValueError: the state is of another version or another run.
        """
        ...


@dataclass(frozen=True)
class Stage:
    """One selection stage: how many candidates go on, and the data the driver scores them with.

    Attributes:
        survivors: candidates of this stage promoted to the next one (in the last stage only the best is
            kept, whatever this says).
        fitness_tokens: calibration tokens each candidate is scored on.
        train_tokens: tokens of light training before scoring (0 = score as cut).
    """

    survivors: int
    fitness_tokens: int
    train_tokens: int = 0

    def __post_init__(self) -> None:
        if self.survivors < 1 or self.fitness_tokens < 1 or self.train_tokens < 0:
            raise ValueError(f"bad stage {self}: need survivors >= 1, fitness_tokens >= 1, train_tokens >= 0")

    def to_dict(self) -> dict:
        return {"survivors": self.survivors, "fitness_tokens": self.fitness_tokens, "train_tokens": self.train_tokens}

    @classmethod
    def from_dict(cls, data: dict) -> Stage:
        return cls(**data)


@dataclass(frozen=True)
class Request:
    """One evaluation to run: score `genome` with the settings of `stage_spec` and data drawn from `seed`.

    `seed` is shared by every candidate a strategy scores on the same terms (common random numbers), and
    re-running draws the same data. `final` marks a request scored on the terms every final candidate
    shares, so its fitness may enter the front.
    """

    candidate_id: str
    genome: PruneGenome
    generation: int
    stage: int
    is_parent: bool
    seed: int
    stage_spec: Stage
    final: bool

    def to_dict(self) -> dict:
        return {
            "candidate_id": self.candidate_id,
            "genome": self.genome.to_dict(),
            "generation": self.generation,
            "stage": self.stage,
            "is_parent": self.is_parent,
            "seed": self.seed,
            "stage_spec": self.stage_spec.to_dict(),
            "final": self.final,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Request:
        return cls(
            candidate_id=data["candidate_id"],
            genome=PruneGenome.from_dict(data["genome"]),
            generation=data["generation"],
            stage=data["stage"],
            is_parent=data["is_parent"],
            seed=data["seed"],
            stage_spec=Stage.from_dict(data["stage_spec"]),
            final=data["final"],
        )


def check_fitness(fitness: float | None, error: str | None) -> tuple[float | None, str | None]:
    """Normalise a told result: a non-finite fitness counts as a failure."""
    if fitness is not None and not math.isfinite(fitness):
        return None, error or f"non-finite fitness {fitness}"
    if fitness is None:
        return None, error or "failed"
    return float(fitness), error


def told_index(requests: Sequence[Request], given: int, results: dict[str, float | None], candidate_id: str) -> int:
    """The index of `candidate_id` among the first `given` requests, for a strategy's `tell`.

    Raises:
        ValueError: It was not asked, or `results` holds it already.
    """
    index = next((i for i, r in enumerate(requests[:given]) if r.candidate_id == candidate_id), None)
    if index is None:
        raise ValueError(f"unknown candidate {candidate_id!r}: not asked")
    if candidate_id in results:
        raise ValueError(f"candidate {candidate_id!r} was told already")
    return index


class BestSoFar(Generic[C]):
    """The lowest fitness offered so far and its candidate, ties to the earlier request; `start` until one succeeds."""

    def __init__(self, start: C):
        self.start = start
        self._best: tuple[float, int, C] | None = None

    def offer(self, value: float | None, index: int, candidate: C) -> None:
        """Consider request `index`'s fitness `value` (None: it failed)."""
        if value is not None and (self._best is None or (value, index) < self._best[:2]):
            self._best = (value, index, candidate)

    @property
    def candidate(self) -> C:
        return self.start if self._best is None else self._best[2]

    @property
    def fitness(self) -> float | None:
        return None if self._best is None else self._best[0]


def evaluations_per_generation(offspring: int, survivors: Sequence[int]) -> int:
    """Evaluations of one evolution generation: λ offspring, the survivors of every stage but the last, the parent."""
    return offspring + sum(survivors[:-1]) + 1


def planned_budget(generations: int, offspring: int, survivors: Sequence[int]) -> int:
    """The evolution's evaluations for one target: the start, then every stage of every generation.

    The other strategies get the same budget, so their results compare at equal cost.
    """
    return 1 + generations * evaluations_per_generation(offspring, survivors)
