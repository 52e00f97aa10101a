"""The level database: what every level of every layer's attention and MLP looks like, built once and reused.

For each decoder layer and group the database holds the units in removal order (levels are nested: level k
removes the first `table.removed(kind, k)` of them). A criterion whose levels carry tensors (`stores_weights`,
see `workers.criteria.base.LevelCriterion`) also has, per level, what its `level_weights` yields: the o_proj /
down_proj weight after ZipLM's OBS updates (`obs`; the removed columns zero, computed on the dense model's
activations so that levels of different layers combine freely, as in DarwinLM), or the output shift of FLAP's
bias compensation (`flap` with `bias_compensation`). Other criteria cut masks: their levels keep the dense
weights of the kept columns (`workers.candidate` cuts them either way). A table with neural implants
(`LevelTable.implant_ranks`) also holds, whatever the criterion, each implant fitted on the dense model's
activations (`workers.implants`), one file per layer, group and implant level.

A database is named by (model fingerprint, calibration digest, criterion and its options, level table) and
stored under `<database dir>/<criterion>-<key>/`: `index.json` plus, for a criterion whose levels carry
tensors, one safetensors file per layer, group and level. The first job builds it under a file lock; later jobs
and every evaluator open it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from darwinfront.core import settings
from workers import criteria, implants
from workers.configuration import model_fingerprint
from workers.levels import KINDS, LevelTable, removal_orders
from workers.reference import build_once

FORMAT = "darwinfront.level_database/1"
INDEX = "index.json"


def calibration_digest(tokens: torch.Tensor) -> str:
    """A hash of calibration token ids (shape and values)."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def database_key(fingerprint: str, digest: str, criterion: str, options: dict, table: LevelTable) -> str:
    """The name of a database: a hash of everything that decides its contents."""
    blob = json.dumps(
        {"format": FORMAT, "model": fingerprint, "calibration": digest, "criterion": criterion,
         "options": options, "table": table.to_dict()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LevelDatabase:
    """An opened level database (the index in memory, weights read from disk on demand).

    Attributes:
        directory: where it lives.
        key: its name (see `database_key`).
        criterion: the criterion that filled it.
        table: its level table.
        orders: per layer, kind -> units in removal order.
        stores_weights: True when levels carry tensors (updated weights, output shifts), False for masks.
        options: the criterion's constructor arguments (part of the key).
        built: True when this call built it, False when it was found in the cache.
    """

    directory: Path
    key: str
    criterion: str
    table: LevelTable
    orders: tuple[dict[str, tuple[int, ...]], ...]
    stores_weights: bool
    options: dict
    built: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.orders)

    def weight_path(self, layer: int, kind: str, level: int) -> Path:
        return self.directory / f"layer{layer:03d}.{kind}.level{level:03d}.safetensors"

    def load_level(self, layer: int, kind: str, level: int, *, device=None) -> dict[str, torch.Tensor]:
        """What `level` >= 1 of `kind`'s target linear in `layer` carries: `weight` (out, in) and / or `shift`
        (out,), as the criterion's `LinearLevels` gave them (databases that store weights)."""
        if not self.stores_weights or level < 1:
            raise ValueError(f"{self.criterion} database stores no weight for layer {layer} {kind} level {level}")
        return load_file(self.weight_path(layer, kind, level), device=str(device or "cpu"))

    def implant_path(self, layer: int, kind: str, level: int) -> Path:
        return self.directory / f"layer{layer:03d}.{kind}.implant{level:03d}.safetensors"

    def load_implant(self, layer: int, kind: str, level: int, *, device=None) -> dict[str, torch.Tensor]:
        """The fitted neural implant of `kind` in `layer` at `level`: `in` (r, hidden) and `out` (hidden, r)."""
        if not self.table.implant_rank(kind, level):
            raise ValueError(f"database {self.key} has no implant for layer {layer} {kind} level {level}")
        return load_file(self.implant_path(layer, kind, level), device=str(device or "cpu"))

    def removed(self, layer: int, kind: str, level: int) -> tuple[int, ...]:
        """Units of `layer` that `level` of `kind` removes."""
        return self.orders[layer][kind][: self.table.removed(kind, level)]

    def summary(self) -> dict:
        """What a job records about its database (JSON-safe, small)."""
        return {"key": self.key, "directory": str(self.directory), "criterion": self.criterion,
                "options": self.options, "table": self.table.to_dict(), "stores_weights": self.stores_weights,
                "built": self.built}

    @classmethod
    def open(cls, directory: str | Path, *, built: bool = False) -> LevelDatabase:
        """Open the database stored in `directory`."""
        directory = Path(directory)
        index = json.loads((directory / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{directory} holds {index.get('format')!r}, not {FORMAT}")
        orders = tuple({k: tuple(layer[k]) for k in KINDS} for layer in index["orders"])
        return cls(directory, index["key"], index["criterion"], LevelTable.from_dict(index["table"]), orders,
                   index["stores_weights"], index["options"], built)


def build(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    criterion: str,
    table: LevelTable,
    options: dict | None = None,
    root: Path | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    helpers: LayerHelpers | None = None,
) -> LevelDatabase:
    """Open the database of (model, calibration, criterion, options, table), building it first if needed.

    Args:
        model: the dense model (read, never written).
        calibration: token ids (N, T) the criterion scores on (and OBS gathers its Hessians from).
        criterion: a registered criterion name (`workers.criteria.names()`).
        table: the level table.
        options: the criterion's constructor arguments (e.g. `{"seed": 3}` for `random`, `{"batch_size": 4}`);
            part of the key.
        root: the folder databases live in (default `darwinfront.core.settings.database_dir()`).
        on_layer: called with (layers done, layers) as a criterion whose levels carry tensors finishes each layer.
        helpers: other workers that compute a share of such a criterion's layers while this process
            computes the rest: layer i goes to worker i mod (helpers.count + 1), worker 0 being this one. Their
            results come back through `helpers` and are written here, so no disk is shared.
    """
    options = dict(options or {})
    key = database_key(model_fingerprint(model), calibration_digest(calibration), criterion, options, table)
    final = (root or settings.database_dir()) / f"{criterion}-{key}"
    made = []

    def write(out: Path) -> None:
        made.append(out)
        _write(out, model, calibration, criterion=criterion, options=options, table=table, key=key,
               on_layer=on_layer, helpers=helpers)

    build_once(final, write)
    return LevelDatabase.open(final, built=bool(made))


def _write(out: Path, model, calibration, *, criterion, options, table, key, on_layer, helpers) -> None:
    scorer = criteria.get(criterion, attention_unit=table.attention_unit, **options)
    if criteria.stores_weights(scorer):
        orders = _write_levels(out, scorer, model, calibration, table, on_layer, helpers)
    else:
        orders = removal_orders(scorer.score(model, calibration))
    if table.implant_ranks:
        _write_implants(out, model, calibration, table)
    index = {"format": FORMAT, "key": key, "criterion": criterion, "options": options, "table": table.to_dict(),
             "stores_weights": criteria.stores_weights(scorer), "orders": orders}
    (out / INDEX).write_text(json.dumps(index))


IMPLANT_MOMENT_BYTES = 1 << 30  # the float64 XᵀX and XᵀY held at once while fitting implants


def _write_implants(out: Path, model, calibration, table: LevelTable) -> None:
    """Fit and write every neural implant of `table` (`workers.implants`), one file per layer, kind and level.

    Layers go in groups whose activation moments fit in `IMPLANT_MOMENT_BYTES` (one pass over the calibration
    tokens per group: all layers at once for small models, a few at a time for 4096-wide ones)."""
    ranks = {kind: {level: table.implant_rank(kind, level) for level in table.implant_levels(kind)} for kind in KINDS}
    hidden, n_layers = model.config.hidden_size, len(model.model.layers)
    per_layer = 2 * hidden * hidden * 8 * sum(1 for kind in KINDS if ranks[kind])
    group = max(1, IMPLANT_MOMENT_BYTES // max(per_layer, 1))
    for start in range(0, n_layers, group):
        layers = list(range(start, min(start + group, n_layers)))
        for i, fitted in implants.implant_levels(model, calibration, ranks, layers=layers):
            for kind, per_level in fitted.items():
                for level, tensors in per_level.items():
                    save_file({k: t.to("cpu").contiguous() for k, t in tensors.items()},
                              out / f"layer{i:03d}.{kind}.implant{level:03d}.safetensors")


class LayerHelpers(Protocol):
    """Workers elsewhere that compute given layers of a database whose levels carry tensors (see
    `workers.pool.RemoteLayers`)."""

    count: int

    def start(self, shares: list[list[int]]) -> None:
        """Start helper k on the layers `shares[k]`."""

    def poll(self) -> list[tuple[int, dict]]:
        """The (layer, kind -> LinearLevels) results that have arrived, without waiting."""

    def drain(self) -> Iterator[tuple[int, dict]]:
        """Every result still to come, waiting for each."""


def _write_levels(
    out: Path, scorer: criteria.LevelCriterion, model, calibration, table: LevelTable, on_layer=None, helpers=None
) -> list[dict]:
    """Run `scorer.level_weights` layer by layer, writing each layer's level tensors as it finishes (memory: one
    layer's levels); with `helpers`, they compute their share of the layers meanwhile and this process writes
    theirs too."""
    counts = {kind: table.counts(kind) for kind in KINDS}
    n_layers = len(model.model.layers)
    workers = 1 + (helpers.count if helpers is not None else 0)
    shares = [[i for i in range(n_layers) if i % workers == k] for k in range(workers)]
    orders: dict[int, dict] = {}

    def store(i: int, result: dict[str, criteria.LinearLevels]) -> None:
        for kind in KINDS:
            levels = result[kind]
            for level, count in enumerate(counts[kind]):
                tensors = {"weight": levels.weights.get(count), "shift": levels.shifts.get(count)}
                tensors = {name: t.to("cpu").contiguous() for name, t in tensors.items() if t is not None}
                if level and tensors:
                    save_file(tensors, out / f"layer{i:03d}.{kind}.level{level:03d}.safetensors")
        orders[i] = {kind: result[kind].order.tolist() for kind in KINDS}
        if on_layer is not None:
            on_layer(len(orders), n_layers)

    if helpers is not None:
        helpers.start(shares[1:])
    for i, result in scorer.level_weights(model, calibration, counts, layers=shares[0]):
        store(i, result)
        for j, theirs in helpers.poll() if helpers is not None else ():
            store(j, theirs)
    for j, theirs in helpers.drain() if helpers is not None else ():
        store(j, theirs)
    missing = sorted(set(range(n_layers)) - set(orders))
    if missing:
        raise RuntimeError(f"the {scorer.name} database lacks layers {missing}: a helper returned too little")
    return [orders[i] for i in range(n_layers)]
