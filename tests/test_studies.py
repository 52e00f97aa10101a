"""Each job's Optuna study lives in the store's Redis under the job's own key prefix (`study_storage`)."""

from __future__ import annotations

import optuna
import pytest

from darwinfront.core import keys
from darwinfront.core.studies import study_storage
from service.history import study_trials
from workers.tracking import open_study

pytest_plugins = ["service_fixtures"]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_study_is_written_under_its_job_and_read_back_by_the_history(redis_server, redis_client) -> None:
    study = open_study(redis_server.url, "studies-a")
    study.add_trial(optuna.trial.create_trial(values=[0.5, 100.0], user_attrs={"generation": 2}))
    open_study(redis_server.url, "studies-b")  # another job's study stays apart

    assert redis_client.keys(f"{keys.optuna_prefix('studies-a')}*")
    assert study_trials(redis_server.url, "studies-a") == [(2, {"kl": 0.5, "params": 100.0})]
    assert study_trials(redis_server.url, "studies-b") == []
    assert study_trials(redis_server.url, "studies-c") == []  # no study at all
    reopened = optuna.load_study(study_name=None, storage=study_storage(redis_server.url, "studies-a"))
    assert [trial.values for trial in reopened.trials] == [[0.5, 100.0]]
