"""A prune job's prepare step: load the model, build (or find) the level database, score the dense baseline."""

from __future__ import annotations

from service.spec import JobSpec
from workers import levels, metrics
from workers.job_inputs import JobInputs, open_database


def prepare(spec_dict: dict) -> dict:
    """Describe a job's model: its level space and database, and the dense baseline.

    Runs once per job (as a Ray task) and builds the level database if no earlier job did; raises with a
    readable message when the model or data can't be used.
    """
    spec = JobSpec.model_validate(spec_dict)
    inputs = JobInputs.load(spec)
    db = open_database(inputs)
    space = levels.level_space(inputs.model, db.table)
    return {
        "space": space.to_dict(),
        "database": db.summary(),
        "dense": {
            "params": space.dense_params,
            "perplexity": metrics.perplexity(inputs.model, inputs.held_out, batch_size=8),
        },
        "calibration_sequences": int(inputs.calibration.shape[0]),
        "training_sequences": int(inputs.training.shape[0]),
    }
