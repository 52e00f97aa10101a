"""The pool survives lost evaluators on a real local Ray, with toy evaluator actors (no model): each request comes
back once, a dead evaluator is replaced where the cluster has room and dropped where it has none, and every loss is
told as an event. Also the `DARWINFRONT_EVALUATOR_RESOURCES` setting."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from pydantic import ValidationError

from darwinfront.core.settings import Settings

SLOT = "darwinfront_evaluator"


class Echo:
    """An evaluator that answers a request with its candidate id, after `delay` seconds."""

    def __init__(self, spec: dict, prepared: dict, threads: int):
        self.delay = spec["delay"]

    def evaluate(self, request: dict) -> dict:
        time.sleep(self.delay)
        return {"candidate_id": request["candidate_id"], "seconds": self.delay, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()


def test_evaluator_resources_are_custom_and_positive(monkeypatch):
    monkeypatch.setenv("DARWINFRONT_EVALUATOR_RESOURCES", json.dumps({SLOT: 1}))
    assert Settings().evaluator_resources == {SLOT: 1.0}
    for bad in ({"GPU": 1}, {SLOT: 0}):
        monkeypatch.setenv("DARWINFRONT_EVALUATOR_RESOURCES", json.dumps(bad))
        with pytest.raises(ValidationError, match="DARWINFRONT_EVALUATOR_RESOURCES"):
            Settings()


@pytest.fixture(scope="module")
def slotted_ray():
    """A local Ray offering 2 evaluator slots (and 3 CPUs, so a squatter actor can take a freed slot)."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    ray.init(num_cpus=3, resources={SLOT: 2}, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def pinned(monkeypatch):
    monkeypatch.setenv("DARWINFRONT_EVALUATOR_RESOURCES", json.dumps({SLOT: 1}))
    monkeypatch.setenv("DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS", "3")


def _requests(n: int) -> list[dict]:
    return [{"candidate_id": f"c{i}"} for i in range(n)]


pytestmark = pytest.mark.integration


def test_a_lost_evaluator_is_replaced_on_the_slot_it_freed(slotted_ray, pinned):
    from workers.pool import EvaluatorPool

    events: list[tuple[str, dict]] = []
    pool = EvaluatorPool({"delay": 0.3}, {}, size=2, evaluator=Echo, on_event=lambda k, d: events.append((k, d)))
    try:
        pool.wait_ready()
        doomed = slotted_ray.get(pool.actors[0].pid.remote())
        replies = pool.map_unordered(_requests(8))
        seen = [next(replies)]
        os.kill(doomed, signal.SIGKILL)
        seen += list(replies)
        assert sorted(r["candidate_id"] for r, _ in seen) == sorted(r["candidate_id"] for r in _requests(8))
        assert all("error" not in reply for _, reply in seen)
        later = list(pool.map_unordered(_requests(24)))  # long enough for the replacement to start and join
        assert len({reply["pid"] for _, reply in later}) == 2 and doomed not in {reply["pid"] for _, reply in later}
        kinds = [k for k, _ in events]
        assert kinds[0] == "evaluator_lost" and kinds.count("evaluator_replaced") == 1
        lost = events[0][1]
        assert lost["retried"] is True and lost["candidate_id"] in {r["candidate_id"] for r, _ in seen}
        assert "ActorDiedError" in lost["error"] or "RayActorError" in lost["error"]
        assert len(pool.actors) == 2 and pool.lost == 1
        assert pool.call("pid") != doomed  # a later call goes to a live evaluator
    finally:
        pool.shutdown()


def test_a_replacement_without_room_is_dropped_and_the_rest_finish(slotted_ray, pinned):
    from workers.pool import EvaluatorPool

    events: list[tuple[str, dict]] = []
    pool = EvaluatorPool({"delay": 0.3}, {}, size=2, evaluator=Echo, on_event=lambda k, d: events.append((k, d)))
    squatter = slotted_ray.remote(Echo).options(resources={SLOT: 1}, num_cpus=0).remote({"delay": 0}, {}, 0)
    try:
        pool.wait_ready()
        doomed = slotted_ray.get(pool.actors[0].pid.remote())
        replies = pool.map_unordered(_requests(6))
        seen = [next(replies)]
        os.kill(doomed, signal.SIGKILL)  # its slot goes to the squatter, waiting since before
        seen += list(replies)
        assert sorted(r["candidate_id"] for r, _ in seen) == sorted(r["candidate_id"] for r in _requests(6))
        assert all("error" not in reply for _, reply in seen)
        kinds = [k for k, _ in events]
        assert kinds[:1] == ["evaluator_lost"] and "evaluator_replaced" not in kinds
        more = pool.map_unordered(_requests(14))  # outlasts the replacement's 3 s, which is then dropped
        assert len(list(more)) == 14
        assert "evaluator_dropped" in [k for k, _ in events]
        dropped = next(d for k, d in events if k == "evaluator_dropped")
        assert dropped["evaluators"] == 1 and "within 3 s" in dropped["reason"]
        assert len(pool.actors) == 1
    finally:
        pool.shutdown()
        slotted_ray.kill(squatter)
