"""Text sources and the calibration / evaluation pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darwinfront.core.errors import InvalidSpec
from workers import data


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return data.load_texts("builtin:pydoc")


@pytest.fixture(scope="module")
def tokenizer(texts):
    from workers.reference import train_tokenizer

    return train_tokenizer(texts[:10], vocab_size=300)


def test_builtin_pydoc_is_the_help_topics_in_key_order(texts):
    from pydoc_data.topics import topics

    assert len(texts) == len(topics)
    assert texts[0] == topics[min(topics)]
    assert texts[-1] == topics[max(topics)]


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird\n")
    assert data.load_texts(str(path)) == ["first doc\nstill first", "second doc", "third"]


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "a b", "id": 1}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert data.load_texts(str(path)) == ["a b", "c"]
    path.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(InvalidSpec, match="corpus.jsonl:1 has no string field 'text'"):
        data.load_texts(str(path))
    path.write_text("{not json\n")
    with pytest.raises(InvalidSpec, match="is not JSON"):
        data.load_texts(str(path))


def test_empty_or_unknown_sources_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(InvalidSpec, match="holds no text") as info:
        data.load_texts(str(empty))
    assert info.value.field == "data.source"
    with pytest.raises(InvalidSpec, match="unknown builtin dataset 'wiki'"):
        data.load_texts("builtin:wiki")
    with pytest.raises(InvalidSpec, match="not a .txt or .jsonl"):
        data.load_texts(str(tmp_path))


def test_hub_ids_need_the_datasets_package_and_the_hub():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidSpec, match="needs the `datasets` package"):
            data.load_texts("someone/some-corpus")
        return
    # datasets is installed (the eval extra brings it): offline, a hub id is a clear error naming the field. The
    # hub mode is read when datasets is imported, so in a fresh process.
    code = ("from darwinfront.core.errors import InvalidSpec\nfrom workers import data\n"
            "try:\n    data.load_texts('someone/some-corpus')\nexcept InvalidSpec as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "data.source" in out.stdout and "cannot load 'someone/some-corpus' from the hub" in out.stdout, out


def test_splits_are_disjoint_cover_everything_and_follow_the_seed(texts):
    calibration = data.split_documents(texts, "calibration", seed=0)
    evaluation = data.split_documents(texts, "evaluation", seed=0)
    assert sorted(calibration + evaluation) == sorted(texts)
    assert not set(calibration) & set(evaluation)
    share = sum(map(len, calibration)) / sum(map(len, texts))
    assert 0.8 < share < 0.97
    assert data.split_documents(texts, "calibration", seed=0) == calibration
    assert data.split_documents(texts, "evaluation", seed=1) != evaluation


def test_token_sequences_shape_eos_and_determinism(texts, tokenizer):
    seqs = data.token_sequences(tokenizer, texts, n_tokens=1000, seq_len=64, split="calibration", seed=0)
    assert seqs.shape == (16, 64) and seqs.dtype == torch.long  # ceil(1000 / 64)
    again = data.token_sequences(tokenizer, texts, n_tokens=1000, seq_len=64, split="calibration", seed=0)
    assert torch.equal(seqs, again)
    docs = data.split_documents(texts, "calibration", 0)
    stream = data.token_stream(tokenizer, docs)
    assert torch.equal(seqs.reshape(-1), stream[: 16 * 64])
    assert (stream == tokenizer.eos_token_id).sum() == len(docs)  # one EOS after every document
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert stream[len(first)] == tokenizer.eos_token_id
    head = data.token_stream(tokenizer, docs, limit=len(first) + 2)  # stops after the second document
    second = tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    assert torch.equal(head, stream[: len(first) + len(second) + 2])


def test_evaluation_sequences_come_from_the_evaluation_documents_only(texts, tokenizer):
    ev = data.token_sequences(tokenizer, texts, n_tokens=2048, seq_len=128, split="evaluation", seed=0)
    ev_stream = data.token_stream(tokenizer, data.split_documents(texts, "evaluation", 0))
    assert torch.equal(ev.reshape(-1), ev_stream[: ev.numel()])
    cal = data.token_sequences(tokenizer, texts, n_tokens=4096, seq_len=128, split="calibration", seed=0)
    assert not {tuple(r.tolist()) for r in cal} & {tuple(r.tolist()) for r in ev}


def test_too_small_pool_names_the_field(texts, tokenizer):
    with pytest.raises(InvalidSpec) as info:
        data.token_sequences(tokenizer, texts, n_tokens=10_000_000, seq_len=128, split="evaluation", seed=0)
    assert info.value.field == "data.eval_tokens"
    with pytest.raises(InvalidSpec) as info:
        data.token_sequences(tokenizer, texts, n_tokens=10_000_000, seq_len=128, split="calibration", seed=0)
    assert info.value.field == "data.calibration_tokens"
