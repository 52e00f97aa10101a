"""A job's inputs, loaded the same way by its prepare step and by every evaluator: the model, the token pools
and the level database."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from darwinfront.core.spec import DataSpec, PruneJobSpec
from search.nirvana import UnitSaliency
from workers import calibration_select, criteria, data, database, levels, modeling
from workers.progress import StepReport, format_seconds


@dataclass
class JobInputs:
    """What every evaluator of a job holds: the dense model and the token pools.

    `calibration` is the fitness pool and `training` the disjoint training pool that follows it in the
    calibration documents; `database` is the first `data.database_tokens` of the two together.
    """

    spec: PruneJobSpec
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor  # (N, T) token ids
    training: torch.Tensor  # (M, T) token ids, M may be 0
    database: torch.Tensor  # (D, T) token ids
    held_out: torch.Tensor  # (E, T) token ids
    selection: dict | None = None  # `data.selection: kl`: the chosen draw's rows, every draw's KL

    @classmethod
    def load(cls, spec: PruneJobSpec, selection: dict | None = None) -> JobInputs:
        """The job's model and pools; with `data.selection: kl` the database pool is the chosen draw, computed
        here unless `selection` (a prepare step's record of it) is given."""
        model, tokenizer = modeling.load_model(
            spec.model.source, dtype=spec.model.dtype, device=spec.model.device, revision=spec.model.revision
        )
        modeling.check_architecture(model)
        device = next(model.parameters()).device
        pools = {k: v.to(device) for k, v in token_pools(tokenizer, spec.data, spec.seed).items()}
        if spec.data.selection == "kl":
            pool = pools.pop("selection_pool")
            if selection is None:
                table = levels.table_for(model, spec.prune.levels, spec.prune.mlp_multiple, spec.prune.attention_unit)
                selection = calibration_select.select(
                    model, pool, pools["calibration"], count=spec.data.selection_candidates,
                    size=pools["database"].shape[0], seed=spec.seed, criterion=job_criterion(spec), table=table,
                    sparsity=spec.data.selection_sparsity,
                )
            pools["database"] = calibration_select.rows_of(pool, selection["rows"])
        return cls(spec, model, tokenizer, **pools, selection=selection)


def token_pools(tokenizer, data_spec: DataSpec, seed: int) -> dict[str, torch.Tensor]:
    """A job's token pools (N, T) from its data section and seed: `calibration` (the fitness pool), `training`
    (disjoint, after it), `database` (the first `database_tokens` of both) and `held_out` (other documents);
    with `data.selection: kl` also `selection_pool`, the first `selection_pool` sequences the draws come from.

    The same spec and tokenizer give the same tokens anywhere, which is what lets a downloaded configuration
    rebuild its level database (`workers.configuration.rebuild`)."""
    texts = data.load_texts(data_spec.source)
    t = data_spec.seq_len
    n_fit, n_train = -(-data_spec.calibration_tokens // t), -(-data_spec.train_tokens // t)
    n_db = -(-data_spec.database_tokens // t)
    n_sel = data_spec.selection_pool if data_spec.selection == "kl" else 0
    pool = data.token_sequences(
        tokenizer, texts, n_tokens=max(n_fit + n_train, n_db, n_sel) * t, seq_len=t, split="calibration", seed=seed
    )
    held_out = data.token_sequences(
        tokenizer, texts, n_tokens=data_spec.eval_tokens, seq_len=t, split="evaluation", seed=seed
    )
    pools = {"calibration": pool[:n_fit], "training": pool[n_fit : n_fit + n_train], "database": pool[:n_db],
             "held_out": held_out}
    return {**pools, "selection_pool": pool[:n_sel]} if n_sel else pools


def database_options(spec: PruneJobSpec) -> dict:
    """The criterion options that name a job's database: the seed (for `random` only), the job options the
    criterion accepts (`prune.bias_compensation`, when on) and the settings the job tunes
    (`prune.criterion_options`)."""
    prune = spec.prune
    options = {"seed": spec.seed} if prune.criterion == "random" else {}
    options.update(prune.criterion_options)
    return {**options, "bias_compensation": True} if prune.bias_compensation else options


def job_criterion(spec: PruneJobSpec) -> criteria.Criterion:
    """The criterion that fills a job's level database, with the database's options."""
    return criteria.get(spec.prune.criterion, attention_unit=spec.prune.attention_unit, **database_options(spec))


def stores_weights(spec: PruneJobSpec) -> bool:
    """Whether a job's level database carries tensors (built layer by layer, so helpers can share the build)."""
    return criteria.stores_weights(job_criterion(spec))


def job_table(inputs: JobInputs) -> levels.LevelTable:
    """The level table of the job's model under its prune section."""
    prune = inputs.spec.prune
    return levels.table_for(inputs.model, prune.levels, prune.mlp_multiple, prune.attention_unit,
                            implants=prune.implants)


def open_database(
    inputs: JobInputs, report: StepReport | None = None, helpers: database.LayerHelpers | None = None
) -> database.LevelDatabase:
    """The job's level database, built on first use (once per model, calibration, criterion and table).

    With `report`, the build is reported (layer by layer where the criterion works per layer), and a database
    found in the cache says so. `helpers` share a per-layer build with other workers (see `database.build`).
    """
    spec = inputs.spec
    table = job_table(inputs)
    options = database_options(spec)
    started = time.perf_counter()
    if report is not None:
        report("database", f"opening the {spec.prune.criterion} level database "
               f"({inputs.database.numel():,} tokens, {table.attn_levels}+{table.mlp_levels} levels per layer)")
    db = database.build(inputs.model, inputs.database, criterion=spec.prune.criterion, table=table,
                        options=options, on_layer=report.counter("database", "layers") if report else None,
                        helpers=helpers)
    if report is not None:
        how = f"built in {format_seconds(time.perf_counter() - started)}" if db.built else "found in the cache"
        report("database", f"{spec.prune.criterion} level database {db.key} {how}")
    return db


def unit_saliency(inputs: JobInputs, db: database.LevelDatabase) -> UnitSaliency:
    """The job criterion's unit scores, per layer in the database's removal order, for a strategy that ranks units
    across layers (`nirvana`): the criterion's `score` on the database tokens; a criterion whose levels carry
    tensors (`obs`) ranks by its removal step, the position in the order (its own score), without a second pass."""
    table = db.table
    if stores_weights(inputs.spec):
        ranked = [{k: list(range(table.units(k))) for k in levels.KINDS} for _ in db.orders]
    else:
        scores = job_criterion(inputs.spec).score(inputs.model, inputs.database)
        ranked = [{k: [float(getattr(s, k)[u]) for u in order[k]] for k in levels.KINDS}
                  for s, order in zip(scores.layers, db.orders, strict=True)]
    return UnitSaliency(attn=[r["attn"] for r in ranked], mlp=[r["mlp"] for r in ranked],
                        attn_step=table.attn_step, mlp_step=table.mlp_step)
