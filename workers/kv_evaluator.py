"""Scoring KV-cache precision configurations: profile once, then KL with K/V quantized inside the forward."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from darwinfront.core.methods import parse_spec
from darwinfront.core.spec import KVJobSpec
from search.kv_space import build_space
from workers import data, metrics, modeling, transfer
from workers.kv.cache import KVPrecisionConfig, build_cache, kv_bits, model_shape
from workers.kv.profile import profile_kv
from workers.progress import StepReport


def _load(spec: KVJobSpec):
    model, tokenizer = modeling.load_model(
        spec.model.source, dtype=spec.model.dtype, device=spec.model.device, revision=spec.model.revision
    )
    texts = data.load_texts(spec.data.source)
    tokens = data.token_sequences(
        tokenizer, texts, n_tokens=spec.data.calibration_tokens, seq_len=spec.data.seq_len,
        split="calibration", seed=spec.seed,
    )
    return model, tokens


def config_for(spec: KVJobSpec, layers: list[list[int]]) -> KVPrecisionConfig:
    kv = spec.kv
    return KVPrecisionConfig(layers=tuple(map(tuple, layers)), mode=kv.mode, group_size=kv.group_size,
                             residual=kv.residual)


def prepare_kv(spec_dict: dict, report: StepReport | None = None, threads: int = 0) -> dict:
    """Profile every layer under every bit pair, prune dominated pairs and group layers (KVTuner's offline step).

    `report` and `threads` as for the prune job's `workers.prepare.prepare`.
    """
    report = report or StepReport()
    if threads > 0:
        torch.set_num_threads(threads)
    spec = parse_spec(spec_dict)
    report("model", f"loading {spec.model.source} and tokenizing {spec.data.source}")
    model, tokens = _load(spec)
    num_layers, _, head_dim = model_shape(model)
    report("profile", f"profiling {num_layers} layers under {len(set(spec.kv.bits)) ** 2} K/V bit pairs")
    table = profile_kv(
        model, tokens[: spec.kv.profile_sequences].to(model.device), mode=spec.kv.mode,
        group_size=spec.kv.group_size, bits=tuple(sorted(set(spec.kv.bits))),
    )
    space = build_space(table, eps=spec.kv.eps)
    return {"table": table, "space": space.to_dict(), "num_layers": num_layers, "head_dim": head_dim,
            "full_space": len(spec.kv.bits) ** (2 * num_layers)}


@torch.inference_mode()
def kl_with_cache(model, tokens: torch.Tensor, teacher: torch.Tensor, config: KVPrecisionConfig,
                  batch_size: int = 8) -> float:
    """Mean KL(full precision ‖ quantized) over predicted positions, K/V quantized within the same forward."""
    total, count = 0.0, 0
    for chunk, target in zip(tokens.split(batch_size), teacher.split(batch_size), strict=True):
        cache = build_cache(model, config, storage="simulated", quantize_in_forward=True)
        logits = model(input_ids=chunk.to(model.device), past_key_values=cache, use_cache=True).logits[:, :-1]
        student = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, vocab)
        total += metrics.kl_sum(target.to(student.device), student).item()
        count += student.shape[0] * student.shape[1]
    return total / count


class KVEvaluator:
    """Holds the model, calibration tokens and full-precision log-probabilities of one KV job (a Ray actor)."""

    def __init__(self, spec_dict: dict, prepared: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        transfer.bring(prepared.get("files"))  # a builtin model the prepare step built on another node
        self.spec = parse_spec(spec_dict)
        self.model, self.tokens = _load(self.spec)
        self.teacher = metrics.teacher_logprobs(self.model, self.tokens, batch_size=8)
        self.head_dim = prepared["head_dim"]

    def evaluate(self, request: dict) -> dict:
        """Score `request["layers"]`; failures come back as `error`, never raise."""
        start = time.perf_counter()
        reply = dict(request)
        try:
            config = config_for(self.spec, request["layers"])
            kl = kl_with_cache(self.model, self.tokens, self.teacher, config)
            if not torch.isfinite(torch.tensor(kl)):
                raise ValueError(f"non-finite KL {kl}")
            reply["kl"] = kl
            reply["bits"] = kv_bits(config, seq_len=self.spec.data.seq_len, head_dim=self.head_dim)
        except Exception as exc:  # reported back as the candidate's failure reason
            reply["error"] = f"{type(exc).__name__}: {exc}"
        reply["seconds"] = time.perf_counter() - start
        return reply
