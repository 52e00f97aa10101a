"""A job that asks for GPUs the Ray cluster does not have fails in bounded time, saying what it asked."""

from __future__ import annotations

import time

import pytest

from darwinfront.core.errors import InvalidSpec
from workers.placement import evaluator_demand, gpu_slots, slots, wait_placeable


def _node(gpus: float, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": 8.0, **({"GPU": gpus} if gpus else {})}}


def test_gpu_slots_count_whole_tasks_per_node_on_alive_nodes():
    nodes = [_node(8), _node(3), _node(0), _node(8, alive=False)]
    assert gpu_slots(1, nodes) == 11
    assert gpu_slots(2, nodes) == 5  # 4 + 1: a 2-GPU task does not span the 3-GPU node's odd GPU and another's
    assert gpu_slots(0.5, nodes) == 22
    assert gpu_slots(4, nodes) == 2
    assert gpu_slots(16, nodes) == 0


@pytest.mark.integration
def test_a_cpu_cluster_refuses_gpu_tasks_after_the_timeout_and_takes_cpu_ones_at_once(local_ray):
    wait_placeable(0.0, 64, timeout=0)  # CPU tasks are never held back
    started = time.monotonic()
    with pytest.raises(InvalidSpec) as info:
        wait_placeable(1.0, 2, timeout=0.5, poll=0.1)
    assert 0.5 <= time.monotonic() - started < 10
    assert info.value.field == "resources.gpus_per_evaluator"
    assert "2 task(s) of 1 GPU(s)" in str(info.value) and "0 GPU(s) in all" in str(info.value)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from workers.pool import init_ray

    init_ray(num_cpus=1)
    yield
    ray.shutdown()


def test_slots_take_each_nodes_scarcest_resource():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0, "darwinfront_evaluator": 2.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}},  # the head: GPUs but no evaluator resource
        {"Alive": False, "Resources": {"CPU": 8.0, "darwinfront_evaluator": 8.0}},
    ]
    assert slots({"GPU": 1, "darwinfront_evaluator": 1}, nodes) == 2
    assert slots({"darwinfront_evaluator": 1}, nodes) == 2  # the dead node's 8 do not count
    assert slots({"darwinfront_evaluator": 0.5}, nodes) == 4
    assert slots({"GPU": 1}, nodes) == gpu_slots(1, nodes) == 8
    assert evaluator_demand(0.0, {"darwinfront_evaluator": 1}) == {"darwinfront_evaluator": 1}
    assert evaluator_demand(0.0) == {} and evaluator_demand(2.0) == {"GPU": 2.0}


@pytest.mark.integration
def test_a_cluster_without_the_evaluator_resource_refuses_the_job_in_bounded_time(local_ray):
    with pytest.raises(InvalidSpec) as info:
        wait_placeable(0.0, 2, timeout=0.3, poll=0.1, resources={"darwinfront_evaluator": 1})
    assert info.value.field == "resources.evaluators"
    assert "'darwinfront_evaluator': 1" in str(info.value) and "ray start --resources" in str(info.value)
