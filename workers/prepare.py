"""A prune job's prepare step: load the model, build (or find) the level database, score the dense baseline.

Every step is reported as it starts (and the database layer by layer, with an ETA) through a `StepReport`, so a
job never sits silent before its first generation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from darwinfront.core.methods import parse_spec
from search import strategies
from workers import levels, metrics
from workers.database import LayerHelpers
from workers.job_inputs import JobInputs, job_criterion, job_table, open_database, unit_saliency
from workers.progress import StepReport, format_seconds


def prepare(
    spec_dict: dict, report: StepReport | None = None, threads: int = 0, helpers: LayerHelpers | None = None
) -> dict:
    """Describe a job's model: its level space and database, and the dense baseline.

    Runs once per job (as a Ray task) and builds the level database if no earlier job did; raises with a
    readable message when the model or data can't be used.

    Args:
        spec_dict: the job spec.
        report: where each step is reported (default: the log only).
        threads: torch threads (0 keeps torch's default). The task runs alone before the job's evaluators
            start, so the driver gives it the node's cores (shared with the helpers).
        helpers: workers that build a share of the database's layers meanwhile (when its levels carry tensors).
    """
    report = report or StepReport()
    if threads > 0:
        torch.set_num_threads(threads)
    spec = parse_spec(spec_dict)
    started = time.perf_counter()
    report("model", f"loading {spec.model.source} and tokenizing {spec.data.source}")
    inputs = JobInputs.load(spec)
    report("model", f"model and data ready in {format_seconds(time.perf_counter() - started)}")
    db = open_database(inputs, report, helpers)
    space = levels.level_space(inputs.model, db.table)
    saliency = None
    if strategies.lookup(spec.search.strategy).needs_saliency:
        report("database", f"unit scores of {spec.prune.criterion} for the {spec.search.strategy} strategy")
        saliency = unit_saliency(inputs, db).to_dict()
    report("dense", f"scoring the dense model on {inputs.held_out.numel():,} held-out tokens")
    return {
        "saliency": saliency,
        "data_selection": inputs.selection,
        "space": space.to_dict(),
        "database": db.summary(),
        "dense": {
            "params": space.dense_params,
            "perplexity": metrics.perplexity(inputs.model, inputs.held_out, batch_size=8),
        },
        "calibration_sequences": int(inputs.calibration.shape[0]),
        "training_sequences": int(inputs.training.shape[0]),
    }


def level_layers(spec_dict: dict, layers: list[int], threads: int = 0) -> Iterator[tuple[int, dict]]:
    """A helper's share of a job's level database whose levels carry tensors: (layer, kind -> LinearLevels on
    the CPU) for each of `layers`, as each finishes; the model and tokens are the job's own, so the results
    equal the prepare step's."""
    if threads > 0:
        torch.set_num_threads(threads)
    inputs = JobInputs.load(parse_spec(spec_dict))
    table = job_table(inputs)
    counts = {kind: table.counts(kind) for kind in levels.KINDS}
    found = job_criterion(inputs.spec).level_weights(inputs.model, inputs.database, counts, layers=layers)
    for i, result in found:
        yield i, {kind: r.cpu() for kind, r in result.items()}


def node_threads() -> int:
    """The cores this process may run on (what a prepare task uses while it runs alone)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
