"""The layer-by-layer walk of the decoder stack: it sees what hooks on the full model see, one layer at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model as surgery_model
from test_criteria_support import calibration, tiny_model

from workers.criteria._common import (
    decoder_layers,
    first_layer_inputs,
    input_stats,
    layerwise_stats,
    micro_batches,
    run_body,
    run_layer,
)

MODELS = {
    "llama_sdpa_fp64": lambda: tiny_model(layers=3),
    "llama_eager_fp64": lambda: tiny_model(layers=3, attn_implementation="eager"),  # a mask tensor in kwargs
    "qwen2_bias_fp32": lambda: surgery_model("qwen2_bias"),
    # sliding-window and global layers, each with its own mask and rotary base: a walk on layer 0's kwargs differs
    "gemma3_fp32": lambda: surgery_model("gemma3"),
}


def _full_model_layer_inputs(model, calib: torch.Tensor, batch_size: int) -> list[list[torch.Tensor]]:
    """Per decoder layer, its input hidden states for every micro-batch, from hooks on one full forward each."""
    seen: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].clone()))
        for i, layer in enumerate(decoder_layers(model))
    ]
    with torch.no_grad():
        for ids in micro_batches(calib, batch_size):
            run_body(model, ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_walked_hidden_states_equal_the_full_models_layer_inputs(name):
    model, calib = MODELS[name](), calibration(n=10, t=24) % 96
    want = _full_model_layer_inputs(model, calib, batch_size=4)
    inputs = first_layer_inputs(model, calib, batch_size=4)
    assert [x.hidden.shape[0] for x in inputs] == [4, 4, 2]
    for i, (layer, expected) in enumerate(zip(decoder_layers(model), want, strict=True)):
        assert all(torch.equal(x.hidden, e) for x, e in zip(inputs, expected, strict=True))
        run_layer(layer, inputs, i)


def test_layerwise_stats_equal_input_stats_and_stop_after_the_last_layer_asked():
    model, calib = tiny_model(layers=3), calibration()
    kinds = ("attn", "mlp")
    every = input_stats(model, calib, kinds, batch_size=5, gram=True)
    walked = list(layerwise_stats(model, calib, kinds, batch_size=5, gram=True))
    assert [i for i, _ in walked] == [0, 1, 2]
    for (_, got), want in zip(walked, every, strict=True):
        for kind in kinds:
            assert got[kind].n == want[kind].n == 16 * 32
            assert torch.equal(got[kind].xtx, want[kind].xtx) and torch.equal(got[kind].sq, want[kind].sq)
    ran = []
    hooks = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in
             enumerate(decoder_layers(model))]
    some = list(layerwise_stats(model, calib, ("mlp",), batch_size=5, gram=True, layers={1}))
    for h in hooks:
        h.remove()
    assert [i for i, _ in some] == [1] and list(some[0][1]) == ["mlp"]
    assert torch.equal(some[0][1]["mlp"].xtx, every[1]["mlp"].xtx)
    assert ran == [0] * 4 + [1] * 4  # four micro-batches through layers 0 and 1; layer 2 never runs
