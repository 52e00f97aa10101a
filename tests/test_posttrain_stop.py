"""A posttrain job stops between training steps when its driver stops (the driver then requeues it)."""

from __future__ import annotations

import threading
import time

import pytest
from test_posttrain import jobs, parent  # noqa: F401 - the fixtures: a finished parent job and its follow-ups

from workers.job import Stopping
from workers.posttrain_job import PosttrainJob

pytest_plugins = ["service_fixtures"]


def test_a_stopping_driver_stops_the_training_between_steps(store, jobs):  # noqa: F811
    job_id = jobs["follow_up"](tokens=64 * 64, batch_size=1)  # 64 steps
    stopping = threading.Event()

    def stop_after_two_steps() -> None:
        deadline = time.monotonic() + 120
        while store.get(job_id).progress.get("step", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping.set()

    stopper = threading.Thread(target=stop_after_two_steps)
    stopper.start()
    with pytest.raises(Stopping):
        PosttrainJob(store, job_id, data_dir=jobs["data_dir"], stopping=stopping, in_process=True).run()
    stopper.join()
    assert 2 <= store.get(job_id).progress["step"] < 64
    assert store.result_ids(job_id) == [] and not store.cancel_requested(job_id)
