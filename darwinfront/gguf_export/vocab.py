"""A Hugging Face `tokenizer.json` (byte-level BPE) as llama.cpp's `gpt2` tokenizer metadata.

llama.cpp splits text before BPE with a regex chosen by `tokenizer.ggml.pre`; we name the one that does what the
directory's own pre-tokenizer does, read from its structure: a byte-level split alone is `gpt-2`'s regex, single
digits first and then the byte-level split is `smollm`'s (SmolLM2). A tokenizer of another shape (SentencePiece,
a custom split regex) is refused rather than written with a split that would tokenize differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as llama.cpp reads it: one token per embedding row, types, merges, special ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    chat_template: str | None


def read_vocab(folder: Path, rows: int) -> Vocab:
    """The vocabulary of model directory `folder`, padded with unused tokens up to `rows` (the embedding's rows).

    Raises:
        ValueError: no `tokenizer.json`, not a byte-level BPE, a split llama.cpp has no name for, or more tokens
            than embedding rows.
    """
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{folder.name} has no tokenizer.json; the GGUF export needs the model's fast tokenizer")
    data = json.loads(file.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r}: the GGUF export writes byte-level BPE only")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    by_id = {int(i): token for token, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= rows:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the embedding only {rows} rows")
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    settings = _read_json(folder / "tokenizer_config.json")
    config = _read_json(folder / "config.json")
    ids = {t: i for i, t in enumerate(tokens)}

    def special(name: str) -> int | None:
        token = settings.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            return ids[token]
        value = config.get(f"{name}_id")
        return value[0] if isinstance(value, list) else value

    return Vocab(tokens=tokens, types=[int(t) for t in types], merges=merges, pre=pre, bos=special("bos_token"),
                 eos=special("eos_token"), pad=special("pad_token"), add_bos=_adds_bos(data, special("bos_token")),
                 chat_template=settings.get("chat_template") or _read_text(folder / "chat_template.jinja"))


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a `tokenizer.json` pre-tokenizer (`ValueError` when it has none that splits alike)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
    raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]}: the GGUF export knows llama.cpp's split only for a "
                     "byte-level BPE (gpt-2) and digits-then-byte-level (smollm)")


def add_to(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Write `vocab`'s `tokenizer.ggml.*` keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.pad, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _adds_bos(data: dict, bos: int | None) -> bool:
    """Whether the tokenizer's post-processor puts the bos token before a single text."""
    post = data.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return "SpecialToken" in first and bos is not None
    return False


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
