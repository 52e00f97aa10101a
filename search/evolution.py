"""(1+λ) evolution with multi-stage selection (EvoPress / DarwinLM), as an ask/tell strategy.

Each generation mutates the parent into λ offspring, screens them on cheap settings and promotes the best to
dearer ones, stage by stage. The parent re-enters only in the last stage (decided by stage index) and is
re-scored there with fresh data, so one lucky evaluation cannot keep a parent alive. The best of the last
stage becomes the next parent; the parent keeps its place on ties.

The strategy never evaluates anything: `ask()` hands out `Request`s, `tell()` takes back fitnesses (lower is
better). Results are keyed by candidate id and selection sorts by (fitness, index), so the outcome does not
depend on the order results arrive in, and every random draw comes from a seed derived from
(job seed, key, generation, ...), so a run restored with `load_state_dict()` continues exactly as it would have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from search.genome import LevelSpace, PruneGenome
from search.mutation import Mutation, level_switch, offspring
from search.seeding import derive_seed
from search.strategy import Request, Stage, check_fitness

STATE_VERSION = 1


# DarwinLM's released schedule (scripts/struct_prune_search.sh): 16 offspring, 8/4/2/1 survivors.
DEFAULT_OFFSPRING = 16
DEFAULT_STAGES = (
    Stage(8, 1024, 10_000),
    Stage(4, 2048, 50_000),
    Stage(2, 4096, 100_000),
    Stage(1, 8192, 200_000),
)


class Evolution:
    """The (1+λ) evolution of one target, with staged selection, as ask/tell.

    Generation 0 (if `score_parent_at_start`) scores the start genome once on the last stage's settings, so
    the front holds the uniform point. Generations 1..`generations` then each run every stage: stage 0 holds
    λ new offspring (distinct, not the parent, never seen before in this run), stage s+1 the best
    `stages[s].survivors` of stage s, and the last stage adds the parent. A failed candidate (fitness None
    or not finite) is never promoted; when every candidate of a stage fails, the generation ends and keeps
    the old parent. When no unseen offspring can be made the run is `exhausted` and ends early.

    Args:
        space: the level space.
        start: the first parent (usually `space.uniform(target)`).
        seed: the job seed.
        key: what tells this run from the job's other runs (the target index); part of ids and seeds.
        generations: evolution generations to run after generation 0.
        offspring: λ, the mutants per generation.
        stages: the selection schedule, cheapest first.
        mutate: `mutate(parent, space, rng) -> genome`.
        score_parent_at_start: run generation 0.
    """

    def __init__(
        self,
        space: LevelSpace,
        start: PruneGenome,
        *,
        seed: int,
        key: int | str,
        generations: int,
        offspring: int = DEFAULT_OFFSPRING,
        stages: Sequence[Stage] = DEFAULT_STAGES,
        mutate: Mutation = level_switch,
        score_parent_at_start: bool = True,
    ):
        space.check(start)
        if generations < 0 or offspring < 1 or not stages:
            raise ValueError(f"need generations >= 0, offspring >= 1 and a stage, got {generations}, {offspring}")
        self._space, self._start, self._seed, self._key = space, start, seed, key
        self._generations, self._lambda, self._stages = generations, offspring, tuple(stages)
        self._mutate, self._score_start = mutate, score_parent_at_start
        self._parent, self._parent_fitness = start, None
        self._seen = {start.key()}
        self._completed, self._in_start = 0, score_parent_at_start
        self._exhausted = False
        self._history: list[dict] = []
        self._evaluations = 0
        self._gen_failures = 0
        self._stage_index: int | None = None
        self._requests: list[Request] = []
        self._asked: set[str] = set()
        self._results: dict[str, tuple[float | None, str | None]] = {}
        if self._in_start:
            self._open_stage(len(self._stages) - 1, [])
        else:
            self._start_generation()

    # ---- the ask/tell interface -------------------------------------------------------------------------

    def ask(self, limit: int | None = None) -> list[Request]:
        """Requests of the current stage not handed out yet, at most `limit` of them.

        Empty while the rest of the stage is being evaluated, and once the run is finished.
        """
        fresh = [r for r in self._requests if r.candidate_id not in self._asked]
        if limit is not None:
            fresh = fresh[: max(0, limit)]
        self._asked.update(r.candidate_id for r in fresh)
        return fresh

    def tell(self, candidate_id: str, fitness: float | None, error: str | None = None) -> None:
        """Record the fitness (lower is better) of an asked request; None (or NaN/inf) marks a failure.

        Raises:
            ValueError: `candidate_id` was not asked in the current stage, or was told already.
        """
        if candidate_id not in self._asked:
            raise ValueError(f"unknown candidate {candidate_id!r}: not asked in the current stage")
        if candidate_id in self._results:
            raise ValueError(f"candidate {candidate_id!r} was told already")
        self._results[candidate_id] = check_fitness(fitness, error)
        self._evaluations += 1
        if self._results[candidate_id][0] is None:
            self._gen_failures += 1
        if len(self._results) == len(self._requests):
            self._advance()

    # ---- read-only views ---------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Evolution generations completed (generation 0, the start's scoring, is not counted)."""
        return self._completed

    @property
    def stage(self) -> int | None:
        """Index of the stage being evaluated, None when finished."""
        return None if self.finished else self._stage_index

    @property
    def parent(self) -> PruneGenome:
        return self._parent

    @property
    def parent_fitness(self) -> float | None:
        """The parent's latest fitness (re-scored every generation); None before it was first scored."""
        return self._parent_fitness

    best = parent
    best_fitness = parent_fitness

    @property
    def finished(self) -> bool:
        return not self._requests

    @property
    def exhausted(self) -> bool:
        """True when the run ended early because no unseen offspring of the parent was left."""
        return self._exhausted

    @property
    def evaluations(self) -> int:
        """Results told so far, failures included."""
        return self._evaluations

    @property
    def rounds(self) -> int:
        """Generations finished, generation 0 (the start's scoring) included."""
        return len(self._history)

    @property
    def history(self) -> list[dict]:
        """One entry per finished generation (0 included).

        Keys: `generation`; `parent` and `parent_fitness`, the parent after the generation; `incumbent_fitness`,
        the old parent's re-score this generation; `best_fitness`, the best challenger of the last stage (None
        when none reached it or all failed); `changed`, whether the parent was replaced; `failures`.
        """
        return [dict(entry) for entry in self._history]

    # ---- the state machine -------------------------------------------------------------------------------

    @property
    def _current_generation(self) -> int:
        return 0 if self._in_start else self._completed + 1

    def _open_stage(self, stage: int, genomes: Sequence[PruneGenome]) -> None:
        generation = self._current_generation
        spec = self._stages[stage]
        last = stage == len(self._stages) - 1
        # The last stage draws the same data and training order every generation, so the parent's score there
        # is one number across generations and the best per target can only go down; earlier stages draw afresh.
        seed = derive_seed(self._seed, self._key, "final" if last else generation, stage)
        prefix = f"t{self._key}-g{generation}-s{stage}-c"
        requests = [
            Request(f"{prefix}{i}", g, generation, stage, False, seed, spec, last) for i, g in enumerate(genomes)
        ]
        if last:
            requests.append(Request(f"{prefix}p", self._parent, generation, stage, True, seed, spec, True))
        self._stage_index, self._requests = stage, requests
        self._asked, self._results = set(), {}

    def _start_generation(self) -> None:
        self._gen_failures = 0
        if self._completed >= self._generations:
            self._requests = []
            return
        rng = random.Random(derive_seed(self._seed, self._key, self._completed + 1, "offspring"))
        children = offspring(self._parent, self._space, rng, self._lambda, seen=self._seen, mutate=self._mutate)
        if not children:
            self._exhausted, self._requests = True, []
            return
        self._seen.update(child.key() for child in children)
        self._open_stage(0, children)

    def _ranked(self) -> list[tuple[float, int, Request]]:
        """Successful requests of the stage, best first; the parent wins ties (rank -1)."""
        ranked = []
        for index, request in enumerate(self._requests):
            fitness = self._results[request.candidate_id][0]
            if fitness is not None:
                ranked.append((fitness, -1 if request.is_parent else index, request))
        return sorted(ranked, key=lambda item: item[:2])

    def _advance(self) -> None:
        ranked = self._ranked()
        last = self._stage_index == len(self._stages) - 1
        if not last and ranked:
            keep = self._stages[self._stage_index].survivors
            self._open_stage(self._stage_index + 1, [request.genome for _, _, request in ranked[:keep]])
            return
        winner = ranked[0] if ranked else None
        incumbent = next((f for f, _, r in ranked if r.is_parent), None)
        challengers = [f for f, _, r in ranked if not r.is_parent] if last else []
        self._finish_generation(winner, incumbent, min(challengers, default=None))

    def _finish_generation(
        self, winner: tuple[float, int, Request] | None, incumbent: float | None, best: float | None
    ) -> None:
        changed = winner is not None and not winner[2].is_parent
        if winner is not None:
            self._parent, self._parent_fitness = winner[2].genome, winner[0]
        self._history.append(
            {
                "generation": self._current_generation,
                "parent": self._parent.key(),
                "parent_fitness": self._parent_fitness,
                "incumbent_fitness": incumbent,
                "best_fitness": best,
                "changed": changed,
                "failures": self._gen_failures,
            }
        )
        if self._in_start:
            self._in_start = False
        else:
            self._completed += 1
        self._start_generation()

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "space": self._space.to_dict(),
            "start": self._start.to_dict(),
            "seed": self._seed,
            "key": self._key,
            "generations": self._generations,
            "offspring": self._lambda,
            "stages": [stage.to_dict() for stage in self._stages],
            "score_parent_at_start": self._score_start,
        }

    def state_dict(self) -> dict:
        """The whole state as JSON-safe data, with the settings it was made with.

        Taken mid-stage it is still complete: after `load_state_dict`, `ask()` hands out again the requests of
        the stage that had no result yet.
        """
        return {
            "version": STATE_VERSION,
            "strategy": "evolution",
            "settings": self._settings(),
            "parent": self._parent.to_dict(),
            "parent_fitness": self._parent_fitness,
            "seen": sorted(self._seen),
            "completed": self._completed,
            "in_start": self._in_start,
            "exhausted": self._exhausted,
            "history": self.history,
            "evaluations": self._evaluations,
            "generation_failures": self._gen_failures,
            "stage": self._stage_index,
            "requests": [request.to_dict() for request in self._requests],
            "results": {cid: list(result) for cid, result in self._results.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue, on this fresh evolution, from `state_dict()` output of a run made with the same settings (and
        mutation operator).

        Raises:
            ValueError: another version, a run with other settings (space, start, seed, key, schedule), or this
                evolution was asked already.
        """
        if state.get("version") != STATE_VERSION or state.get("strategy") != "evolution":
            raise ValueError(f"not an evolution state of version {STATE_VERSION}: "
                             f"{state.get('strategy')!r} version {state.get('version')!r}")
        if state["settings"] != json.loads(json.dumps(self._settings())):  # as JSON: tuples read back as lists
            raise ValueError(f"the state is of another run (key {state['settings']['key']!r}, "
                             f"seed {state['settings']['seed']}); build the evolution with its settings")
        if self._asked or self._evaluations:
            raise ValueError("load_state_dict needs a fresh evolution; this one was asked already")
        self._parent, self._parent_fitness = PruneGenome.from_dict(state["parent"]), state["parent_fitness"]
        self._seen = set(state["seen"])
        self._completed, self._in_start, self._exhausted = state["completed"], state["in_start"], state["exhausted"]
        self._history = [dict(entry) for entry in state["history"]]
        self._evaluations, self._gen_failures = state["evaluations"], state["generation_failures"]
        self._stage_index = state["stage"]
        self._requests = [Request.from_dict(request) for request in state["requests"]]
        self._results = {cid: (result[0], result[1]) for cid, result in state["results"].items()}
        self._asked = set(self._results)
