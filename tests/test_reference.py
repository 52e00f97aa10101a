"""The builtin reference models: build-once caching, the trained micro model, and the training schedule."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from workers import reference

torch.set_num_threads(1)


def _slow_build(log: str, out: Path) -> None:
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(0.3)  # long enough that the other callers arrive while the lock is held
    (out / "payload.txt").write_text("done")


def _call_build_once(final: str, log: str) -> None:
    reference.build_once(Path(final), lambda out: _slow_build(log, out))


def test_build_once_builds_once_across_processes(tmp_path):
    final, log = tmp_path / "models" / "thing-abc", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_call_build_once, args=(str(final), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert (final / "payload.txt").read_text() == "done"
    assert final.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing-abc", "thing-abc.lock"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    final = tmp_path / "thing"

    def fail(out: Path) -> None:
        (out / "half.bin").write_text("x")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        reference.build_once(final, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.lock"]


def test_lr_schedule_warms_up_then_decays_to_min():
    recipe = reference.RECIPES["micro-llama"]
    assert reference.lr_at(0, recipe) == pytest.approx(recipe.lr / recipe.warmup_steps)
    assert reference.lr_at(recipe.warmup_steps, recipe) == pytest.approx(recipe.lr)
    assert reference.lr_at(recipe.steps, recipe) == pytest.approx(recipe.min_lr)
    mid = (recipe.warmup_steps + recipe.steps) / 2
    assert reference.lr_at(int(mid), recipe) == pytest.approx((recipe.lr + recipe.min_lr) / 2, rel=0.05)


def test_batches_are_deterministic_and_in_bounds():
    recipe = reference.RECIPES["micro-llama"]
    stream = torch.arange(5000)
    first = reference.get_batch(stream, 0, recipe)
    assert first.shape == (recipe.batch_size, recipe.seq_len)
    assert torch.equal(first, reference.get_batch(stream, 0, recipe))
    assert not torch.equal(first, reference.get_batch(stream, 1, recipe))
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(recipe.batch_size, recipe.seq_len - 1).long())
    steps = range(200)  # several epochs: every window stays inside the stream
    assert max(int(reference.get_batch(stream, s, recipe).max()) for s in steps) < 5000


def test_recipe_key_names_the_directory(micro_dir):
    recipe = reference.RECIPES["micro-llama"]
    assert micro_dir.name == f"micro-llama-{recipe.key()}"
    assert reference.builtin_model_dir("micro-llama") == micro_dir  # cached: no second build
    assert dataclasses.replace(recipe, steps=recipe.steps + 1).key() != recipe.key()


def test_micro_model_is_a_standard_directory_that_learned(micro_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    tokenizer = AutoTokenizer.from_pretrained(micro_dir)
    recipe = reference.RECIPES["micro-llama"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.tie_word_embeddings) == (2, 128, True)
    assert len(tokenizer) == config.vocab_size == recipe.vocab_size
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == (reference.BOS, reference.EOS, reference.PAD)
    text = "for item in sequence:\n    print(item)"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    report = reference.recipe_report(micro_dir)
    assert report["recipe"]["name"] == "micro-llama" and report["recipe_key"] == recipe.key()
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["heldout_loss"] < torch.log(torch.tensor(float(recipe.vocab_size))).item() - 1.0  # beats uniform
    assert json.loads((micro_dir / reference.RECIPE_FILE).read_text()) == report


def test_recipe_report_refuses_other_directories(tmp_path):
    from darwinfront.core.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="not a darwinfront reference model"):
        reference.recipe_report(tmp_path)


@pytest.mark.integration
def test_training_is_deterministic(micro_dir, tmp_path):
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(reference.recipe_report(micro_dir)["torch_threads"])  # same reduction order
    try:
        reference.train_reference(reference.RECIPES["micro-llama"], tmp_path)
    finally:
        torch.set_num_threads(threads)
    fresh, cached = load_file(tmp_path / "model.safetensors"), load_file(micro_dir / "model.safetensors")
    assert fresh.keys() == cached.keys()
    for key in fresh:
        assert torch.equal(fresh[key], cached[key]), key


@pytest.mark.integration
def test_tiny_llama_shape_and_recorded_heldout_loss(micro_dir):
    """Builds builtin:tiny-llama on first use (minutes); the recorded held-out loss must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers import data

    tiny_dir = reference.builtin_model_dir("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (128, 4, 8, 4)
    assert (c.head_dim, c.intermediate_size, c.max_position_embeddings, c.vocab_size) == (16, 512, 512, 2048)
    assert c.tie_word_embeddings

    report = reference.recipe_report(tiny_dir)
    docs = data.split_documents(data.load_texts("builtin:pydoc"), "evaluation", report["recipe"]["seed"])
    stream = data.token_stream(tokenizer, docs)
    held_out = stream[: stream.numel() // 128 * 128].view(-1, 128)
    assert held_out.numel() == report["heldout_tokens"]
    assert reference.mean_loss(model, held_out) == pytest.approx(report["heldout_loss"], abs=2e-4)
    assert report["heldout_loss"] < reference.recipe_report(micro_dir)["heldout_loss"] - 0.5
