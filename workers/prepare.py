"""A prune job's prepare step: load the model, build (or find) the level database, score the dense baseline.

Every step is reported as it starts (and the database layer by layer, with an ETA) through a `StepReport`, so a
job never sits silent before its first generation.
"""

from __future__ import annotations

import os
import time

import torch

from service.spec import JobSpec
from workers import levels, metrics
from workers.job_inputs import JobInputs, open_database
from workers.progress import StepReport, format_seconds


def prepare(spec_dict: dict, report: StepReport | None = None, threads: int = 0) -> dict:
    """Describe a job's model: its level space and database, and the dense baseline.

    Runs once per job (as a Ray task) and builds the level database if no earlier job did; raises with a
    readable message when the model or data can't be used.

    Args:
        spec_dict: the job spec.
        report: where each step is reported (default: the log only).
        threads: torch threads (0 keeps torch's default). The task runs alone before the job's evaluators
            start, so the driver gives it the node's cores.
    """
    report = report or StepReport()
    if threads > 0:
        torch.set_num_threads(threads)
    spec = JobSpec.model_validate(spec_dict)
    started = time.perf_counter()
    report("model", f"loading {spec.model.source} and tokenizing {spec.data.source}")
    inputs = JobInputs.load(spec)
    report("model", f"model and data ready in {format_seconds(time.perf_counter() - started)}")
    db = open_database(inputs, report)
    space = levels.level_space(inputs.model, db.table)
    report("dense", f"scoring the dense model on {inputs.held_out.numel():,} held-out tokens")
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


def node_threads() -> int:
    """The cores this process may run on (what a prepare task uses while it runs alone)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
