"""Each job's Optuna study, kept in the job store's Redis as a journal under the job's own key prefix. Part of
the job store: the drivers record every evaluated candidate there (`workers.tracking`), the API reads the
history from it (`service.history`), and `darwinfront optuna-dashboard` opens it.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalRedisBackend

from darwinfront.core import keys

# Optuna marks the Redis journal experimental; it warns on every construction, attributed to this module.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="darwinfront.core.studies")


def study_storage(redis_url: str, job_id: str) -> JournalStorage:
    """The Optuna storage of `job_id`'s study, on the Redis at `redis_url` (nothing connects until it is used)."""
    return JournalStorage(JournalRedisBackend(redis_url, prefix=keys.optuna_prefix(job_id)))
