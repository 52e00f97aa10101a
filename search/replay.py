"""Checkpoints by replay, for strategies whose state is what they were asked and told, and rounds of a budget.

A seeded strategy that keeps no state of its own beyond its asks and tells (random search, NSGA-II through
Optuna) is checkpointed as the log of those calls: a fresh instance built with the same arguments replays the
log and is then in the very state the first one was in, its sampler's random state included, which no JSON
dump of a sampler could promise. Requests that were asked and never told are handed out again first.
"""

from __future__ import annotations

from search.strategy import check_fitness

STATE_VERSION = 1


class Rounds:
    """A budget of requests handed out round by round, each round once every request before it was told.

    The first round holds `first` requests (1: the start alone, as the evolution's generation 0), the others
    `size` each, the last what the budget leaves. Between rounds a driver reports and checkpoints.
    """

    def __init__(self, budget: int, size: int, first: int = 1):
        if budget < 1 or size < 1 or first < 1:
            raise ValueError(f"need budget, round size and first round >= 1, got {budget}, {size}, {first}")
        self.budget, self._size = budget, size
        self._end, self._opened = min(first, budget), 1  # the open round ends before request `_end`

    def room(self, given: int, told: int) -> int:
        """Requests that may be handed out now, opening the next round when the open one is all told."""
        if given >= self._end and told == given and self._end < self.budget:
            self._end, self._opened = min(self.budget, self._end + self._size), self._opened + 1
        return self._end - given

    @property
    def current(self) -> int:
        """Index of the open round (0: the first)."""
        return self._opened - 1

    def completed(self, given: int, told: int, *, ended: bool = False) -> int:
        """Rounds whose requests are all told; `ended`: nothing more will be handed out (the open round is done)."""
        done = told == given and (given >= self._end or ended)
        return self._opened if done else self._opened - 1


class Replayed:
    """`ask`, `tell`, `state_dict` and `load_state_dict` over a subclass's deterministic `_ask` and `_tell`.

    Subclasses set `name` and implement `_ask(limit) -> list` (requests with a `candidate_id`) and
    `_tell(candidate_id, fitness, error, *extra)`, where fitness is already normalised (None for a failure) and
    `extra` is what a subclass's own `tell` passes on to `_logged_tell` (JSON-safe; logged and replayed with it).
    """

    name: str

    def __init__(self) -> None:
        self._log: list[list] = []
        self._again: list = []  # asked before a restart, never told: handed out first

    def ask(self, limit: int | None = None) -> list:
        again = self._again if limit is None else self._again[: max(0, limit)]
        self._again = self._again[len(again):]
        rest = None if limit is None else max(0, limit) - len(again)
        if rest == 0:
            return again
        self._log.append(["ask", rest])
        return again + self._ask(rest)

    def tell(self, candidate_id: str, fitness: float | None, error: str | None = None) -> None:
        self._logged_tell(candidate_id, fitness, error)

    def _logged_tell(self, candidate_id: str, fitness: float | None, error: str | None, *extra) -> None:
        value, error = check_fitness(fitness, error)
        self._tell(candidate_id, value, error, *extra)
        self._log.append(["tell", candidate_id, value, error, *extra])

    def state_dict(self) -> dict:
        """The log of asks and tells (JSON-safe: failures are logged as None, never NaN)."""
        return {"version": STATE_VERSION, "strategy": self.name, "log": [list(entry) for entry in self._log]}

    def load_state_dict(self, state: dict) -> None:
        """Replay `state`'s log on this fresh instance; its untold requests are handed out again first.

        Raises:
            ValueError: another version or strategy, or this instance was used already.
        """
        if state.get("version") != STATE_VERSION or state.get("strategy") != self.name:
            raise ValueError(f"not a {self.name} state of version {STATE_VERSION}: "
                             f"{state.get('strategy')!r} version {state.get('version')!r}")
        if self._log:
            raise ValueError(f"load_state_dict needs a fresh {self.name} strategy; this one was asked already")
        pending: dict[str, object] = {}
        for entry in state["log"]:
            if entry[0] == "ask":
                pending.update((request.candidate_id, request) for request in self._ask(entry[1]))
            else:
                _, candidate_id, fitness, error, *extra = entry
                self._tell(candidate_id, fitness, error, *extra)
                pending.pop(candidate_id)
        self._log = [list(entry) for entry in state["log"]]
        self._again = list(pending.values())
