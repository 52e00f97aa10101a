"""Scoring joint candidates: the sliced model of a genome's levels, with K/V quantized in its forward.

The prepare step builds what a prune job's does (the model, the token pools, the level database) and what a KV
job's does on the same dense model (KVTuner's profile, pruned pair lists and layer groups), and the joint space
with the cache geometry and the deployment point. An evaluator holds the dense model, the level database and the
dense full-precision outputs on the fitness pool; per genome it builds the sliced candidate
(`workers.candidate.build`, the level database's weights) and measures KL(dense ‖ candidate) with a fresh
`workers.kv.cache` cache per batch quantizing K/V inside the forward at the genome's per-layer pairs. When the
spec asks for latency (`deployment.latency`) it also times the candidate as applied: one decoding step of the
sliced model with the packed mixed-precision cache `generate` uses (`workers.latency.decode_latency`), at the
deployment's batch size, the cache holding `deployment.latency.context` tokens, on this evaluator's device and
threads; the prepare step times the dense model with a 16-bit cache the same way (the history's scale).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from darwinfront.core.methods import parse_spec
from search.joint_space import CacheGeometry, Deployment, JointGenome, JointSpace
from search.kv_space import KVGroup, KVSpace, build_space
from workers import candidate, fitness, latency, levels, modeling, slicing, transfer
from workers.configuration import build_configuration
from workers.job_inputs import JobInputs, open_database
from workers.kv.cache import KVPrecisionConfig, build_cache, model_shape
from workers.kv.profile import profile_kv
from workers.progress import StepReport

FORMAT = "darwinfront.joint/1"
CONFIG_FILE = "joint.json"  # the joint configuration, inside a downloaded model archive


def precision(spec, pairs) -> KVPrecisionConfig:
    """The cache config of per-layer `pairs` under the job's `kv` section."""
    return KVPrecisionConfig(tuple(map(tuple, pairs)), spec.kv.mode, spec.kv.group_size, spec.kv.residual)


def cache_geometry(model, spec, table: levels.LevelTable) -> CacheGeometry:
    """The dense model's K/V heads and the job's quantizer settings, defaults resolved as the cache resolves them."""
    num_layers, kv_heads, head_dim = model_shape(model)
    resolved = precision(spec, [(16, 16)] * num_layers)
    per_level = table.attn_step if table.attention_unit == "kv_group" else 0
    return CacheGeometry(kv_heads=kv_heads, head_dim=head_dim, heads_per_level=per_level, mode=resolved.mode,
                         token_group=resolved.token_group(head_dim), key_group=resolved.group_size or 1,
                         residual=resolved.residual)


def with_kv16(space: KVSpace) -> KVSpace:
    """The same groups with the unquantized (16, 16) pair first among every group's candidates."""
    return KVSpace(groups=tuple(KVGroup(g.layers, ((16, 16), *(p for p in g.candidates if p != (16, 16))))
                                for g in space.groups), num_layers=space.num_layers)


def prepare_joint(spec_dict: dict, report: StepReport | None = None, threads: int = 0) -> dict:
    """The joint space of a job: the level database (built once), the KV profile on the dense model, and the
    cache geometry at the deployment point."""
    report = report or StepReport()
    if threads > 0:
        torch.set_num_threads(threads)
    spec = parse_spec(spec_dict)
    report("model", f"loading {spec.model.source} and tokenizing {spec.data.source}")
    inputs = JobInputs.load(spec)
    db = open_database(inputs, report)
    level_space = levels.level_space(inputs.model, db.table)
    bits = tuple(sorted(set(spec.kv.bits)))
    report("profile", f"profiling {level_space.n_layers} layers under {len(bits) ** 2} K/V bit pairs")
    table = profile_kv(inputs.model, inputs.calibration[: spec.kv.profile_sequences], mode=spec.kv.mode,
                       group_size=spec.kv.group_size, bits=bits)
    kv_space = build_space(table, eps=spec.kv.eps)
    if spec.joint.kv16:
        kv_space = with_kv16(kv_space)
    deployment = Deployment(spec.deployment.batch_size, spec.deployment.context, spec.deployment.dtype_bytes)
    space = JointSpace(level_space, kv_space, cache_geometry(inputs.model, spec, db.table), deployment)
    prepared = {"space": space.to_dict(), "sensitivity": table, "database": db.summary(),
                "calibration_sequences": int(inputs.calibration.shape[0])}
    if spec.deployment.latency is not None:
        report("latency", "timing the dense model's decoding step")
        dense16 = precision(spec, [(16, 16)] * level_space.n_layers)
        prepared["dense_latency_ms"] = decode_ms(inputs.model, dense16, spec.deployment)
    return prepared


def decode_ms(model, config: KVPrecisionConfig, deployment) -> float:
    """The latency objective: the median ms of one decoding step of `model` with a packed cache of `config`, at
    `deployment`'s batch size and latency settings (`workers.latency.decode_latency`)."""
    settings = deployment.latency
    timing = latency.decode_latency(model, lambda: build_cache(model, config, storage="packed"),
                                    batch_size=deployment.batch_size, context=settings.context,
                                    repeats=settings.repeats, warmup=settings.warmup)
    if not timing["median_ms"] > 0:
        raise ValueError(f"a decoding step measured {timing['median_ms']} ms")
    return float(timing["median_ms"])


class JointEvaluator:
    """Holds one joint job's dense model, level database and dense outputs (a Ray actor, one per device)."""

    def __init__(self, spec_dict: dict, prepared: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        transfer.bring(prepared.get("files"))  # the database (and builtin model) from the prepare step's node
        self.inputs = JobInputs.load(parse_spec(spec_dict))
        self.spec = self.inputs.spec
        self.space = JointSpace.from_dict(prepared["space"])
        self.database = open_database(self.inputs)
        like = self.inputs.model.model.layers[0].self_attn.o_proj.weight
        self.weights = candidate.LevelWeights(self.database, like) if self.database.stores_weights else None
        self.teacher = fitness.Teacher.of(self.inputs.model, self.inputs.calibration, topk="auto")

    def build(self, genome: JointGenome):
        """The sliced candidate of `genome`'s levels and the cache config of its pairs."""
        model = candidate.build(self.inputs.model, self.database, genome.prune, weights=self.weights)
        return model, precision(self.spec, self.space.pairs(genome))

    def evaluate(self, request: dict) -> dict:
        """Score `request["genome"]`: `kl`, the memory and its parts, and `latency` (ms) when the spec asks for it;
        failures come back as `error`, never raise."""
        start = time.perf_counter()
        reply = {k: request[k] for k in ("candidate_id", "genome", "round") if k in request}
        try:
            genome = JointGenome.from_dict(request["genome"])
            reply.update(memory_of(self.space, genome))
            model, config = self.build(genome)
            kl = fitness.kl(model, self.inputs.calibration, self.teacher,
                            cache=lambda: build_cache(model, config, storage="simulated", quantize_in_forward=True))
            if not torch.isfinite(torch.tensor(kl)):
                raise ValueError(f"non-finite KL {kl}")
            if self.spec.deployment.latency is not None:
                reply["latency"] = decode_ms(model, config, self.spec.deployment)
            reply["kl"] = float(kl)
        except Exception as exc:  # reported back as the candidate's failure reason
            reply["error"] = f"{type(exc).__name__}: {exc}"
        reply["seconds"] = time.perf_counter() - start
        return reply

    def configuration(self, genome_dict: dict, result: dict) -> dict:
        """The downloadable joint configuration of an evaluated genome: the prune configuration (layout,
        parameters), the cache config and its precision map, the deployment point and the memory it needs."""
        genome = JointGenome.from_dict(genome_dict)
        prune = build_configuration(
            spec=self.spec, space=self.space.levels, genome=genome.prune, model=self.inputs.model,
            layout=levels.layout(genome.prune, self.database.orders, self.database.table), result=result,
        )
        prune["level_table"] = self.database.table.to_dict()
        prune["database"] = {"key": self.database.key, "criterion": self.database.criterion,
                             "options": self.database.options}
        config = precision(self.spec, self.space.pairs(genome))
        return {
            "format": FORMAT, "candidate_id": result["candidate_id"], "genome": genome.to_dict(),
            "prune": prune, "kv": config.to_dict(), "kv_map": config.to_kv_map(self.space.cache.head_dim),
            "deployment": self.spec.deployment.model_dump(exclude_none=True), "memory": memory_of(self.space, genome),
            "metrics": {k: result[k] for k in ("kl", "latency") if k in result},
            "weights": "database" if self.weights is not None else "dense",
        }

    def export(self, configuration: dict, directory: str, *, archive: str | None = None) -> dict:
        """Time a forward pass of the candidate as scored (sliced, the level database's weights; into the
        configuration's metrics) and save it with its joint configuration (`joint.json`) under `directory`, or as
        `directory/<archive>.tar` with `archive`."""
        genome = JointGenome.from_dict(configuration["genome"])
        model, config = self.build(genome)
        if slicing.count_parameters(model) != configuration["prune"]["parameters"]:
            raise RuntimeError("the sliced candidate's parameters differ from its configuration's")
        timing = {"latency_ms": latency.forward_latency(model, seq_len=self.spec.data.seq_len)["median_ms"]}
        configuration["metrics"].update(timing)
        dtype = modeling.export_dtype(self.spec.model)
        slicing.save_pruned(model, self.inputs.tokenizer, Path(directory), dtype=dtype,
                            extra={CONFIG_FILE: json.dumps(configuration, indent=1)}, archive=archive)
        return timing

    def export_point(self, request: dict) -> dict:
        """Export one front point where this evaluator runs (`request`: `candidate_id`, `genome`, `result`): its
        configuration and saved model as `<candidate_id>.tar` in a fresh folder of this node's cache, which the
        driver moves into its archive. Returns `candidate_id`, `configuration` (timing in its metrics), `timing`,
        `files`."""
        configuration = self.configuration(request["genome"], request["result"])
        folder = transfer.scratch("exports")
        try:
            timing = self.export(configuration, str(folder), archive=request["candidate_id"])
        except BaseException:
            transfer.remove(str(folder))
            raise
        return {"candidate_id": request["candidate_id"], "configuration": configuration, "timing": timing,
                "files": transfer.here(folder).to_dict()}


def memory_of(space: JointSpace, genome: JointGenome) -> dict:
    """The memory objective of `genome` and its parts, in bytes."""
    return {"memory": space.memory(genome), "weight_bytes": space.weight_bytes(genome),
            "cache_bytes": space.cache_bytes(genome), "params": space.levels.params(genome.prune)}
