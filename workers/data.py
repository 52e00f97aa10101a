"""Text sources and token batches: calibration and held-out evaluation sequences that never share a document."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Literal

import torch

from darwinfront.core.errors import InvalidSpec

Split = Literal["calibration", "evaluation"]
CALIBRATION_SHARE = 0.9
_TOKENIZE_BATCH = 16


def load_texts(source: str) -> list[str]:
    """Load the documents of a text source.

    Args:
        source: `builtin:pydoc` (Python's own help topics, in sorted key order), a local `.txt` file (documents
            separated by blank lines), a local `.jsonl` file (field `text` on every line), or a `datasets` hub id
            (its `train` split, field `text`).

    Returns:
        The non-empty documents, in source order.

    Raises:
        InvalidSpec: on an unknown builtin, a malformed file, a missing `datasets` package or no text at all.
    """
    if source.startswith("builtin:"):
        texts = _builtin_texts(source.removeprefix("builtin:"))
    elif source.endswith(".txt") and Path(source).is_file():
        texts = _blank_line_documents(Path(source).read_text(encoding="utf-8"))
    elif source.endswith(".jsonl") and Path(source).is_file():
        texts = _jsonl_texts(Path(source))
    else:
        texts = _hub_texts(source)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidSpec("data.source", f"{source!r} holds no text")
    return texts


def split_documents(texts: list[str], split: Split, seed: int) -> list[str]:
    """The documents of one split, in a seeded order.

    The documents are shuffled with `seed`; calibration takes the leading documents whose characters come
    closest to 90% of the total, evaluation the rest, so the two pools never share a document and each holds
    at least one.
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if len(texts) < 2:
        raise InvalidSpec("data.source", f"need at least 2 documents to split, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    target = CALIBRATION_SHARE * sum(len(t) for t in texts)
    cut, seen = 1, len(texts[order[0]])
    # take the next document while that brings the calibration share closer to 90%
    while cut < len(order) - 1 and abs(seen + len(texts[order[cut]]) - target) < abs(seen - target):
        seen += len(texts[order[cut]])
        cut += 1
    chosen = order[:cut] if split == "calibration" else order[cut:]
    return [texts[i] for i in chosen]


def token_stream(tokenizer, texts: list[str], limit: int | None = None) -> torch.Tensor:
    """Documents tokenized (no special tokens) and joined with the EOS token after each one, (n,) int64.

    With `limit`, tokenizing stops at the first document that brings the stream to `limit` tokens or more.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidSpec("model.source", "the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        for doc in tokenizer(texts[start : start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
            if limit is not None and len(ids) >= limit:
                return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def token_sequences(
    tokenizer, texts: list[str], *, n_tokens: int, seq_len: int, split: Split, seed: int
) -> torch.Tensor:
    """Cut one split of `texts` into ceil(n_tokens / seq_len) sequences of `seq_len` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        texts: the documents, as `load_texts` returns them.
        n_tokens: tokens wanted; rounded up to whole sequences.
        seq_len: tokens per sequence.
        split: `calibration` or `evaluation` (disjoint document pools, see `split_documents`).
        seed: the seed of the document shuffle.

    Returns:
        LongTensor (N, seq_len).

    Raises:
        InvalidSpec: naming `data.calibration_tokens` or `data.eval_tokens` when the pool is too small.
    """
    if n_tokens < 1 or seq_len < 1:
        raise ValueError(f"n_tokens and seq_len must be positive, got {n_tokens} and {seq_len}")
    need = math.ceil(n_tokens / seq_len)
    stream = token_stream(tokenizer, split_documents(texts, split, seed), limit=need * seq_len)  # (n,)
    have = stream.numel() // seq_len
    if have < need:
        field = "data.calibration_tokens" if split == "calibration" else "data.eval_tokens"
        raise InvalidSpec(
            field,
            f"the {split} pool holds {stream.numel()} tokens = {have} sequences of {seq_len}, "
            f"but {n_tokens} tokens need {need}",
        )
    return stream[: need * seq_len].view(need, seq_len).clone()  # (N, T)


def _builtin_texts(name: str) -> list[str]:
    if name != "pydoc":
        raise InvalidSpec("data.source", f"unknown builtin dataset {name!r}; known: pydoc")
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _blank_line_documents(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidSpec("data.source", f"{path}:{lineno} is not JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InvalidSpec("data.source", f"{path}:{lineno} has no string field 'text'")
            texts.append(record["text"])
    return texts


def _hub_texts(source: str) -> list[str]:
    if Path(source).exists():
        raise InvalidSpec("data.source", f"{source!r} is a local path but not a .txt or .jsonl file")
    try:
        import datasets
    except ImportError as e:
        raise InvalidSpec(
            "data.source",
            f"{source!r} is not builtin:pydoc or a local .txt/.jsonl file, and loading it from the hub "
            "needs the `datasets` package (pip install datasets)",
        ) from e
    try:
        dataset = datasets.load_dataset(source, split="train")
    except (ConnectionError, FileNotFoundError) as e:  # offline, no such dataset, or the hub unreachable
        raise InvalidSpec(
            "data.source",
            f"cannot load {source!r} from the hub ({e}); without the hub, give builtin:pydoc or a local .txt/.jsonl "
            "file",
        ) from e
    if "text" not in dataset.column_names:
        raise InvalidSpec("data.source", f"dataset {source!r} has no 'text' column: {dataset.column_names}")
    return list(dataset["text"])
