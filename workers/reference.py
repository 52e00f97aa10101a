"""The builtin reference models: small Llamas trained by our own code on Python's help topics (`builtin:pydoc`).

A recipe fixes everything (shape, tokenizer size, steps, seed), so a model directory is named by the recipe's
hash and built once per machine: the first caller trains it under a file lock, writes it to a temporary
directory and renames it into place; everyone else waits for the lock and reads the finished directory.
`builtin:smollm2-135m`, a pretrained model shipped as a GGUF file, is built the same way by `workers.gguf_import`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from darwinfront.core import settings
from darwinfront.core.errors import InvalidSpec
from workers import data

log = logging.getLogger(__name__)
RECIPE_FILE = "darwinfront_recipe.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a reference model: its shape, its tokenizer and its training run."""

    name: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_position: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    seed: int = 0
    data_source: str = "builtin:pydoc"
    code_version: int = 1  # bump when the training or data code changes what a recipe produces

    def key(self) -> str:
        """The short hash that names this recipe's directory."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


RECIPES = {
    "tiny-llama": Recipe(
        name="tiny-llama", vocab_size=2048, hidden_size=128, n_layers=4, n_heads=8, n_kv_heads=4,
        intermediate_size=512, max_position=512, seq_len=128, batch_size=16, steps=600,
        lr=3e-3, min_lr=3e-4, warmup_steps=40, weight_decay=0.1,
    ),
    "micro-llama": Recipe(
        name="micro-llama", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
        intermediate_size=128, max_position=256, seq_len=64, batch_size=16, steps=120,
        lr=5e-3, min_lr=5e-4, warmup_steps=10, weight_decay=0.1,
    ),
}


def builtin_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of builtin model `name`, built on first use.

    Args:
        name: a key of `RECIPES` (`tiny-llama`, `micro-llama`), trained here, or of
            `gguf_import.PACKAGED_GGUF` (`smollm2-135m`), dequantized from the GGUF file its package ships.
        cache_dir: the root to build under (default `darwinfront.core.settings.cache_dir()`). A trained model lives in
            `<root>/<name>-<recipe hash>`, a packaged one in `<root>/gguf-<file sha256 prefix>-v<n>`.

    Returns:
        A standard Hugging Face directory (config.json, model.safetensors, tokenizer files, and
        `darwinfront_recipe.json` or `darwinfront_gguf.json`) that `AutoModelForCausalLM.from_pretrained` loads.
    """
    from workers.gguf_import import PACKAGED_GGUF, packaged_model_dir  # it builds on build_once below

    if name in PACKAGED_GGUF:
        return packaged_model_dir(name, cache_dir)
    return build_once(builtin_model_path(name, cache_dir), lambda out: train_reference(RECIPES[name], out))


def builtin_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where `builtin_model_dir` builds builtin model `name`, without building it (the directory may not exist)."""
    from workers.gguf_import import PACKAGED_GGUF, converted_path

    if name in PACKAGED_GGUF:
        return converted_path(PACKAGED_GGUF[name].locate(name), cache_dir)
    if name not in RECIPES:
        known = ", ".join([*RECIPES, *PACKAGED_GGUF])
        raise InvalidSpec("model.source", f"unknown builtin model {name!r}; known: {known}")
    return (cache_dir or settings.cache_dir()) / f"{name}-{RECIPES[name].key()}"


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `final` exists, under a file lock, then rename the result to `final`.

    Concurrent callers (threads or processes) build once: the others block on the lock and find `final` done.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def recipe_report(model_dir: str | Path) -> dict:
    """The recipe and the measured training figures (held-out loss, steps, seconds) of a built reference model."""
    return read_report(model_dir, RECIPE_FILE, "a darwinfront reference model")


def read_report(model_dir: str | Path, name: str, what: str) -> dict:
    """The JSON report `name` that building a model left in its directory (InvalidSpec when it is not `what`)."""
    path = Path(model_dir) / name
    if not path.is_file():
        raise InvalidSpec("model.source", f"{model_dir} is not {what} (no {name})")
    return json.loads(path.read_text())


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast` with bos/eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_config(recipe: Recipe, tokenizer):
    """The LlamaConfig of a recipe (tied embeddings, head_dim = hidden / heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        head_dim=recipe.hidden_size // recipe.n_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay from `lr` to `min_lr` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def get_batch(stream: torch.Tensor, step: int, recipe: Recipe) -> torch.Tensor:
    """Batch `step` of the training order: every epoch shifts the cut by a seeded offset and shuffles the chunks."""
    per_epoch = (stream.numel() - recipe.seq_len) // recipe.seq_len
    batches_per_epoch = per_epoch // recipe.batch_size
    epoch, index = divmod(step, batches_per_epoch)
    g = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
    offset = int(torch.randint(recipe.seq_len, (1,), generator=g))
    order = torch.randperm(per_epoch, generator=g)[index * recipe.batch_size : (index + 1) * recipe.batch_size]
    starts = offset + order * recipe.seq_len  # (B,)
    return torch.stack([stream[s : s + recipe.seq_len] for s in starts.tolist()])  # (B, T)


@torch.no_grad()
def mean_loss(model, sequences: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy of `model` over (N, T) `sequences`, every predicted position weighted alike."""
    model.eval()
    total, count = 0.0, 0
    for chunk in sequences.split(batch_size):
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (B, T-1, vocab)
        targets = chunk[:, 1:]  # (B, T-1)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


def train_reference(recipe: Recipe, out: Path) -> dict:
    """Train `recipe` from scratch on CPU and save it to `out` as a Hugging Face directory with its report."""
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    texts = data.load_texts(recipe.data_source)
    calibration = data.split_documents(texts, "calibration", recipe.seed)
    tokenizer = train_tokenizer(calibration, recipe.vocab_size)
    stream = data.token_stream(tokenizer, calibration)  # (n,)
    evaluation = data.token_stream(tokenizer, data.split_documents(texts, "evaluation", recipe.seed))
    held_out = evaluation[: evaluation.numel() // recipe.seq_len * recipe.seq_len].view(-1, recipe.seq_len)

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(build_config(recipe, tokenizer))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = get_batch(stream, step, recipe)  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log.info("%s step %d/%d loss %.3f", recipe.name, step + 1, recipe.steps, loss.item())
    train_loss = mean_loss(model, torch.stack([get_batch(stream, s, recipe) for s in range(4)]).flatten(0, 1))
    report = {
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": recipe.steps * recipe.batch_size * recipe.seq_len,
        "calibration_pool_tokens": int(stream.numel()),
        "heldout_tokens": int(held_out.numel()),
        "train_loss": round(train_loss, 4),
        "heldout_loss": round(mean_loss(model, held_out), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RECIPE_FILE).write_text(json.dumps(report, indent=2))
    return report


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
