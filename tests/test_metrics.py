"""Known answers for the fitness metrics: KL to oneself is zero, and KL / perplexity match a direct numpy sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from workers import fitness, metrics

torch.set_num_threads(1)


def _tokens(shape=(3, 7)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(0))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_teacher_logprobs_shape_and_normalisation():
    logp = metrics.teacher_logprobs(tiny_model(), _tokens(), batch_size=2)
    assert logp.shape == (3, 6, 96)
    assert logp.dtype == torch.float32 and logp.device.type == "cpu"
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 6))


def test_kl_to_itself_is_zero():
    model, tokens = tiny_model(), _tokens()
    teacher = metrics.teacher_logprobs(model, tokens, batch_size=2)
    assert abs(fitness.kl(model, tokens, fitness.Teacher(logprobs=teacher), batch_size=2)) < 1e-6


def test_kl_matches_numpy_sum():
    teacher_model, student = tiny_model(seed=0), tiny_model(seed=1)
    tokens = _tokens()
    with torch.no_grad():
        p = _log_softmax(teacher_model(input_ids=tokens).logits[:, :-1].double().numpy())
        q = _log_softmax(student(input_ids=tokens).logits[:, :-1].double().numpy())
    expected = float((np.exp(p) * (p - q)).sum(-1).mean())
    teacher = metrics.teacher_logprobs(teacher_model, tokens, batch_size=2)
    got = fitness.kl(student, tokens, fitness.Teacher(logprobs=teacher), batch_size=2)
    assert expected > 0.05  # two different random models disagree
    assert math.isclose(got, expected, rel_tol=1e-5)
    assert math.isclose(fitness.kl(student, tokens, fitness.Teacher(logprobs=teacher), batch_size=3), got, rel_tol=1e-6)


def test_perplexity_matches_numpy():
    model, tokens = tiny_model(), _tokens()
    with torch.no_grad():
        logp = _log_softmax(model(input_ids=tokens).logits[:, :-1].double().numpy())  # (N, T-1, vocab)
    targets = tokens[:, 1:].numpy()
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    assert math.isclose(metrics.mean_nll(model, tokens, batch_size=2), nll, rel_tol=1e-5)
    assert math.isclose(metrics.perplexity(model, tokens, batch_size=1), math.exp(nll), rel_tol=1e-5)


def test_kl_refuses_mismatched_teacher():
    model, tokens = tiny_model(), _tokens()
    teacher = metrics.teacher_logprobs(model, tokens[:2], batch_size=2)
    try:
        fitness.kl(model, tokens, fitness.Teacher(logprobs=teacher), batch_size=2)
    except ValueError as e:
        assert "do not match" in str(e)
    else:
        raise AssertionError("a teacher for other tokens was accepted")


def test_perplexity_of_micro_model_matches_its_recorded_heldout_loss(micro_model, micro_dir):
    from workers import data
    from workers.reference import recipe_report

    model, tokenizer = micro_model
    report = recipe_report(micro_dir)
    seq_len = report["recipe"]["seq_len"]
    docs = data.split_documents(data.load_texts("builtin:pydoc"), "evaluation", report["recipe"]["seed"])
    stream = data.token_stream(tokenizer, docs)
    held_out = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    assert metrics.mean_nll(model, held_out, batch_size=16) == pytest.approx(report["heldout_loss"], abs=2e-4)
