"""A job's inputs, loaded the same way by its prepare step and by every evaluator: the model, the token pools
and the level database."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.spec import JobSpec
from workers import data, database, levels, modeling


@dataclass
class JobInputs:
    """What every evaluator of a job holds: the dense model and the token pools.

    `calibration` is the fitness pool and `training` the disjoint training pool that follows it in the
    calibration documents; `database` is the first `data.database_tokens` of the two together.
    """

    spec: JobSpec
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor  # (N, T) token ids
    training: torch.Tensor  # (M, T) token ids, M may be 0
    database: torch.Tensor  # (D, T) token ids
    held_out: torch.Tensor  # (E, T) token ids

    @classmethod
    def load(cls, spec: JobSpec) -> JobInputs:
        model, tokenizer = modeling.load_model(
            spec.model.source, dtype=spec.model.dtype, device=spec.model.device, revision=spec.model.revision
        )
        modeling.check_architecture(model)
        texts = data.load_texts(spec.data.source)
        d, t = spec.data, spec.data.seq_len
        n_fit, n_train = -(-d.calibration_tokens // t), -(-d.train_tokens // t)
        n_db = -(-d.database_tokens // t)
        pool = data.token_sequences(
            tokenizer, texts, n_tokens=max(n_fit + n_train, n_db) * t, seq_len=t, split="calibration", seed=spec.seed
        )
        held_out = data.token_sequences(
            tokenizer, texts, n_tokens=d.eval_tokens, seq_len=t, split="evaluation", seed=spec.seed
        )
        device = next(model.parameters()).device
        return cls(spec, model, tokenizer, pool[:n_fit].to(device), pool[n_fit : n_fit + n_train].to(device),
                   pool[:n_db].to(device), held_out.to(device))


def open_database(inputs: JobInputs) -> database.LevelDatabase:
    """The job's level database, built on first use (once per model, calibration, criterion and table)."""
    spec = inputs.spec
    table = levels.table_for(inputs.model, spec.prune.levels, spec.prune.mlp_multiple, spec.prune.attention_unit)
    options = {"seed": spec.seed} if spec.prune.criterion == "random" else {}
    return database.build(inputs.model, inputs.database, criterion=spec.prune.criterion, table=table, options=options)
