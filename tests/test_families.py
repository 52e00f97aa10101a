"""Every registered model family on a tiny model built from its config (random weights, GQA): its adapter and
exported code, every criterion's scores, planted dead units, OBS database levels swapped into the model, KV
precision scoring, and one clear refusal for a model of no registered family.

The slicing, masking, `generate`, save/load and parameter-count checks run on the same families through the
`surgery_kind` fixture (tests/test_slicing.py, test_query_heads.py, test_candidate.py, test_database.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

from darwinfront.architectures import SUPPORTED_ARCHITECTURES
from darwinfront.core.errors import InvalidSpec
from search.genome import PruneGenome
from workers import candidate, criteria, database, families, levels, modeling, slicing

# one tiny model per family (Mistral: Llama's layout)
KINDS = ("gemma2", "gemma3", "llama_gqa", "olmo2", "phi3", "qwen2_bias", "qwen3", "mixtral", "qwen3_moe", "olmoe",
         "gpt_neox")
MOE_KINDS = ("mixtral", "qwen3_moe", "olmoe")  # 6 experts of 8 channels, 2 per token
# What each criterion scores a unit whose output weights are zero: exactly 0, except where it cannot promise it.
NOT_EXACTLY_ZERO = {
    "random": "random by design",
    "gate_spsa": "a finite-difference estimate of the gate gradient",
    "hessian_trace": "its weight norm counts the unit's input rows, which stay",
}
# Under whole-projection q/k norms (OLMo 2) an attention unit with zero output columns is not dead: its query and
# key rows still set the other heads' norm statistic. These criteria see that (exact removal, gradients through
# the q/k rows) and rightly score it above zero; the others score the unit by its output alone.
SEE_THE_NORM = {"ablation", "taylor", "nvit"}
# Likewise an expert whose output weights are zero is not dead: the router still gives it a share of the tokens'
# weight, which removing it hands to the other experts. These criteria see the routing (gradients through the
# router) and rightly score it above zero; the others score an expert by its output alone.
SEE_THE_ROUTER = {"taylor", "nvit"}
# Ablation compares a forward whose MLP linears carry its gates' hooks with one that has none; a mixture of experts
# runs its experts as whole linears in the first and expert by expert in the second (`MoEMLP`): the same sums in
# another order, so an ablated dead unit's ΔKL is rounding (~1e-9), not exactly zero.
ROUNDING = {"ablation": 1e-7}


def _calibration(model, n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def _outputs(model, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, logits, greedy tokens from the first 4 ids): what a model laid out by `canonical` must keep."""
    ids = _calibration(model, n=2, t=12) if ids is None else ids
    with torch.inference_mode():
        return ids, model(ids).logits, model.generate(ids[:, :4], max_new_tokens=6, do_sample=False)


def test_every_supported_architecture_has_one_adapter_and_exported_classes_of_its_family():
    import transformers

    assert tuple(families.FAMILIES) == SUPPORTED_ARCHITECTURES
    assert len({f.model_type for f in families.FAMILIES.values()}) == len(SUPPORTED_ARCHITECTURES)
    for architecture, family in families.FAMILIES.items():
        assert issubclass(family.causal_lm_class, getattr(transformers, architecture))
        assert family.config_class.model_type == family.model_type
        assert hasattr(family.transformers_code(), "apply_rotary_pos_emb")


@pytest.mark.parametrize("kind", KINDS)
def test_the_adapter_reads_the_dense_shape_of_its_family(kind):
    model = tiny_model(kind)
    architecture = type(model).__name__
    family = families.family_of(model)
    assert family.architecture == architecture
    shape = families.shape(model)
    kv_heads = 4 if kind == "gpt_neox" else 2  # (GPT-NeoX's attention is multi-head)
    assert (shape.n_layers, shape.hidden, shape.n_heads, shape.n_kv, shape.head_dim, shape.intermediate) == \
        (3, 32, 4, kv_heads, 8, 48)
    assert shape.gated == (kind != "gpt_neox")
    assert (shape.experts, shape.mlp_units, shape.mlp_width) == ((6, 6, 8) if kind in MOE_KINDS else (0, 48, 1))
    # per-head q/k norms (one head_dim weight each) are the attention's only parameters outside its projections
    assert shape.attn_extra_params == (2 * 8 if family.head_norms else 0)


def test_a_model_of_no_registered_family_is_refused_naming_it_and_the_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(InvalidSpec) as refused:
        modeling.check_architecture(model)
    assert refused.value.field == "model.source"
    assert "GPT2LMHeadModel is not supported" in str(refused.value)
    assert all(name in str(refused.value) for name in SUPPORTED_ARCHITECTURES)


def test_a_local_directory_of_no_registered_family_is_refused_at_submission(tmp_path):
    from service.validation import check_architecture

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["BloomForCausalLM"]}))
    with pytest.raises(InvalidSpec, match="BloomForCausalLM is not supported; darwinfront prunes Llama"):
        check_architecture(config, "model.source")
    # none named: the job finds out
    for fine in (["Qwen3ForCausalLM"], ["PrunedGemma3ForCausalLM"], ["Phi3ForCausalLM"], ["GPTNeoXForCausalLM"],
                 None):
        config.write_text(json.dumps({"architectures": fine}))
        check_architecture(config, "model.source")


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_criterion_scores_every_family_and_planted_dead_units_score_zero(kind, unit):
    model = tiny_model(kind)
    families.family_of(model)  # (in its family's layout: Phi-3 split, a mixture of experts as blocks of channels)
    mha = kind == "gpt_neox"  # a KV group is one query head
    group_width = 8 if unit == "q_head" or mha else 16  # o_proj columns of one query head / one KV group (2 heads)
    moe = kind in MOE_KINDS
    dead = slice(8, 16) if moe else 5  # expert 1 / channel 5 of layer 0 writes nothing
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, dead] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, group_width:2 * group_width] = 0  # unit 1 of layer 1
    calibration = _calibration(model)
    for name in criteria.names():
        options = {} if unit == "kv_group" else {"attention_unit": unit}
        scores = criteria.get(name, **options).score(model, calibration)
        assert len(scores) == 3, name
        for layer in scores.layers:
            assert layer.attn.shape == ((4,) if unit == "q_head" or mha else (2,)), name
            assert layer.mlp.shape == ((6,) if moe else (48,)), name
            assert torch.isfinite(layer.attn).all() and torch.isfinite(layer.mlp).all(), name
        if name not in NOT_EXACTLY_ZERO:
            tolerance = ROUNDING.get(name, 0.0) if moe else 0.0
            routed = moe and name in SEE_THE_ROUTER
            dead_mlp = scores.layers[0].mlp[1 if moe else 5].item()
            assert (dead_mlp > 0.0) if routed else (abs(dead_mlp) <= tolerance), (name, scores.layers[0].mlp)
            coupled = families.family_of(model).projection_norms and name in SEE_THE_NORM
            assert (scores.layers[1].attn[1].item() > 0.0) if coupled else \
                (abs(scores.layers[1].attn[1].item()) <= tolerance), (name, scores.layers[1].attn)
            assert (scores.layers[0].mlp != 0).sum() > (2 if moe else 40), name  # the live units do not all score 0


@pytest.mark.parametrize("kind", KINDS)
def test_obs_database_levels_swapped_into_the_model_give_the_candidate_s_logits(kind, tmp_path):
    """An OBS level stores the layer's output weight with the removed units' columns zero and the rest updated;
    the dense model holding those weights computes exactly what the sliced candidate computes (under OLMo 2's
    whole-projection q/k norms, with the masks that keep their statistic to the kept rows)."""
    model = tiny_model(kind)
    calibration = _calibration(model)
    table = levels.table_for(model, levels=6, multiple=8)
    db = database.build(model, calibration, criterion="obs", table=table, root=tmp_path)
    genome = PruneGenome(attn=(1, 0, 1), mlp=(2, 5, 0))  # (a mixture of experts' layer 1 keeps one expert of 6)
    like = model.model.layers[0].self_attn.o_proj.weight
    built = candidate.build(model, db, genome, weights=candidate.LevelWeights(db, like))
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(swapped.model.layers):
            for kind_, level, linear in (("attn", genome.attn[i], layer.self_attn.o_proj),
                                         ("mlp", genome.mlp[i], layer.mlp.down_proj)):
                if level:
                    linear.weight.copy_(db.load_level(i, kind_, level)["weight"])
    with torch.inference_mode(), slicing.masked(swapped, levels.layout(genome, db.orders, db.table)):
        want, got = swapped(calibration).logits, built(calibration).logits
        dense = model(calibration).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, dense, atol=1e-3)  # the levels did change the model


def _local_model(kind: str, folder, **config):
    """A tiny model of `kind` saved with a tokenizer of its vocabulary into `folder`, as a user's directory."""
    from workers import reference

    tokenizer = reference.train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 8, 96)
    model = tiny_model(kind)
    model.resize_token_embeddings(len(tokenizer))  # the tokenizer's special tokens come on top of its 96
    model.config.update(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe", "olmoe",
                                  "gpt_neox"])
def test_kv_precision_is_scored_on_every_family(kind, tmp_path):
    """Gemma 2 and 3 with sliding-window layers (window 4, sequences of 32) as well as global ones; Phi-3 from a
    stock (fused) directory, with a window of 4 over every layer as Phi-3-mini has one."""
    from workers.kv_evaluator import KVEvaluator, prepare_kv

    folder = _local_model(kind, tmp_path / kind, **({"sliding_window": 4} if kind == "phi3" else {}))
    spec = {"name": "kv", "method": "kv_precision", "model": {"source": str(folder), "device": "cpu"},
            "data": {"calibration_tokens": 256, "seq_len": 32}, "kv": {"trials": 2, "profile_sequences": 2},
            "seed": 1}
    prepared = prepare_kv(spec)
    assert prepared["num_layers"] == 3 and prepared["head_dim"] == 8
    evaluator = KVEvaluator(spec, prepared)
    full = evaluator.evaluate({"layers": [[16, 16]] * 3})
    low = evaluator.evaluate({"layers": [[2, 2]] * 3})
    assert "error" not in full and "error" not in low, (full, low)
    assert full["kl"] < 1e-6 < low["kl"]  # 16 bits leave the model as it is; 2 bits do not
    assert (low["bits"]["nominal"], full["bits"]["nominal"]) == (2, 16)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_a_16_bit_kv_cache_on_sliding_window_layers_decodes_as_the_dense_model(kind):
    """The cache keeps a sliding layer's whole history and the model's mask keeps it to the window: token by
    token over three times the window, the logits are the uncached forward's."""
    from workers.kv.cache import build_cache

    model = tiny_model(kind)
    assert "sliding_attention" in model.config.layer_types and model.config.sliding_window == 4
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = build_cache(model, {"layers": [[16, 16]] * 3})
    with torch.inference_mode():
        want = model(ids).logits
        steps = [model(ids[:, :2], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(2, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=0)
    model.config.sliding_window = 64  # the window matters: attending further back gives other logits
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)


def test_an_olmo2_cut_rescales_the_kept_heads_and_the_masks_follow():
    """OLMo 2's q/k norms span the whole projection: the sliced norm keeps the kept rows' weights and takes its
    statistic over them, which zeroing the removed heads' outputs alone does not reproduce."""
    model = tiny_model("olmo2")
    every = tuple(range(48))
    layout = slicing.Layout(tuple(slicing.LayerLayout(a, every) for a in ((1,), (0, 1, 2, 3), (0, 2))), "q_head")
    norms = [model.model.layers[0].self_attn.q_norm.weight.detach().clone(),
             model.model.layers[0].self_attn.k_norm.weight.detach().clone()]
    ids = _calibration(model, n=2, t=10)
    kept = [torch.zeros(32), torch.ones(32), torch.zeros(32)]  # o_proj input columns of the kept query heads
    kept[0][8:16], kept[2][0:8], kept[2][16:24] = 1, 1, 1
    with torch.inference_mode():
        with slicing.masked(model, layout):
            masked = model(ids).logits
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args, k=k: (args[0] * k,))
                 for layer, k in zip(model.model.layers, kept, strict=True)]
        outputs_only = model(ids).logits
        for hook in hooks:
            hook.remove()
    sliced = slicing.slice_model(copy.deepcopy(model), layout)
    attention = sliced.model.layers[0].self_attn
    assert torch.equal(attention.q_norm.weight, norms[0][8:16]) and torch.equal(attention.k_norm.weight, norms[1])
    with torch.inference_mode():
        torch.testing.assert_close(sliced(ids).logits, masked, atol=1e-5, rtol=0)
        assert not torch.allclose(outputs_only, masked, atol=1e-3)  # the same heads kept, not the same norm
    groups = slicing.Layout(tuple(slicing.LayerLayout(a, every) for a in ((1,), (0, 1), (0,))))
    attention = slicing.slice_model(copy.deepcopy(model), groups).model.layers[0].self_attn
    assert torch.equal(attention.q_norm.weight, norms[0][16:32]) and torch.equal(attention.k_norm.weight,
                                                                                 norms[1][8:16])


def test_a_stock_phi3_is_split_into_the_same_model_with_each_unit_s_rows():
    model = tiny_model("phi3")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = attn.qkv_proj.weight.detach().clone(), mlp.gate_up_proj.weight.detach().clone()
    ids, want, want_tokens = _outputs(model)
    count = slicing.count_parameters(model)
    families.family_of(model)  # splits, in place
    layer = model.model.layers[1]
    assert not hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.mlp, "gate_up_proj")
    # 4 query heads, then 2 key heads, then 2 value heads of 8 rows each; gate rows, then up rows
    assert torch.equal(layer.self_attn.q_proj.weight, qkv[:32]) and torch.equal(layer.self_attn.k_proj.weight,
                                                                                qkv[32:48])
    assert torch.equal(layer.self_attn.v_proj.weight, qkv[48:])
    assert torch.equal(layer.mlp.gate_proj.weight, gate_up[:48]) and torch.equal(layer.mlp.up_proj.weight,
                                                                                  gate_up[48:])
    assert slicing.count_parameters(model) == count
    modules = [id(m) for m in model.modules()]
    families.family_of(model)  # a split model is left as it is
    assert [id(m) for m in model.modules()] == modules
    _, logits, tokens = _outputs(model, ids)
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=0)
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt_neox_sequential"])
def test_a_stock_gpt_neox_is_put_in_llama_s_layout_computing_the_same(kind):
    """`canonical` de-interleaves query_key_value (per head: its 8 query rows, 8 key rows, 8 value rows) into
    q/k/v_proj with their biases, holds the MLP as up_proj / down_proj, moves the stack to `model`; the logits and
    greedy generations are the stock model's, with the parallel residual and with the sequential one."""
    model = tiny_model(kind)
    assert model.config.use_parallel_residual == (kind == "gpt_neox")
    fused = model.gpt_neox.layers[1].attention.query_key_value
    weight, bias = fused.weight.detach().clone(), fused.bias.detach().clone()
    up = model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight
    ids, want, want_tokens = _outputs(model)
    count = slicing.count_parameters(model)
    families.family_of(model)
    assert type(model).__name__ == "PrunedGPTNeoXForCausalLM" and "gpt_neox" not in dict(model.named_children())
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    head = slice(2 * 24, 3 * 24)  # head 2's rows of the fused matrix
    assert torch.equal(attention.q_proj.weight[16:24], weight[head][:8])
    assert torch.equal(attention.k_proj.weight[16:24], weight[head][8:16])
    assert torch.equal(attention.v_proj.weight[16:24], weight[head][16:])
    assert torch.equal(attention.v_proj.bias[16:24], bias[head][16:])
    assert mlp.up_proj.weight is up and not hasattr(mlp, "gate_proj")
    assert slicing.count_parameters(model) == count
    modules = [id(m) for m in model.modules()]
    families.family_of(model)  # a model in the layout is left as it is
    assert [id(m) for m in model.modules()] == modules
    _, logits, tokens = _outputs(model, ids)
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=0)
    assert torch.equal(tokens, want_tokens)


def test_a_gpt_neox_is_multi_head_whatever_its_config_says():
    """GPT-NeoX's attention has one K/V head per query head; a stray `num_key_value_heads` in its config (transformers
    keeps unknown keys) does not make it grouped."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=48, num_key_value_heads=2))
    shape = families.shape(model)
    assert (shape.n_heads, shape.n_kv, shape.group) == (4, 4, 1)
    assert model.config.num_key_value_heads == 4


def test_a_gpt_neox_channel_and_head_count_what_they_hold():
    """A non-gated channel is an up row with its bias and a down column (2·hidden + 1); a head its q, k, v rows with
    their biases and its o_proj columns (4·hidden·8 + 3·8): the parameters a cut frees, counted on the model."""
    model = tiny_model("gpt_neox")
    d = slicing.dims(model)
    assert slicing.unit_params(d) == (4 * 32 * 8 + 3 * 8, 2 * 32 + 1)
    before = slicing.count_parameters(model)
    every = tuple(range(48))
    layout = slicing.Layout((slicing.LayerLayout((0, 1, 2), every), slicing.LayerLayout((0, 1, 2, 3), every[5:]),
                             slicing.LayerLayout((0, 1, 2, 3), every)))
    slicing.slice_model(model, layout)
    assert before - slicing.count_parameters(model) == sum(slicing.unit_params(d)) + 4 * (2 * 32 + 1)


def test_a_stock_phi3_directory_loads_split_and_its_cut_exports_to_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _local_model("phi3", tmp_path / "phi3")  # qkv_proj and gate_up_proj on disk, as shipped
    model, _ = modeling.load_model(str(folder), device="cpu")
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    layout = slicing.Layout(tuple(slicing.LayerLayout(a, m) for a, m in
                                  (((1,), tuple(range(0, 48, 3))), ((), tuple(range(48))), ((0, 1), ()))))
    ids = _calibration(model, n=2, t=10)
    with torch.inference_mode(), slicing.masked(model, layout):
        masked = model(ids).logits
    slicing.slice_model(model, layout)
    slicing.save_pruned(model, None, tmp_path / "cut")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", trust_remote_code=True).eval()
    assert type(stock).__name__ == "PrunedPhi3ForCausalLM"
    assert slicing.count_parameters(stock) == slicing.count_parameters(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, masked, atol=1e-5, rtol=0)
        torch.testing.assert_close(stock(ids).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "olmo2", "mixtral", "gpt_neox"])
def test_the_gguf_export_refuses_a_family_llama_cpp_s_deci_cannot_run(kind, tmp_path):
    from darwinfront.gguf_export import write_gguf

    model = tiny_model(kind)
    slicing.slice_model(model, slicing.dense_layout(model))
    slicing.save_pruned(model, None, tmp_path / "candidate")
    with pytest.raises(ValueError, match=f"model_type 'darwinfront_{kind}': the GGUF export writes llama"):
        write_gguf(tmp_path / "candidate", tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()


def test_obs_refuses_a_mixture_of_experts_too_wide_for_its_hessian(monkeypatch):
    """OBS's Hessian spans every column of the MLP's output projection: for a mixture of experts all experts' channels
    together, past what fits (here the limit is lowered to the tiny model's 48 channels minus one)."""
    from workers.criteria import obs

    model = tiny_model("mixtral")
    monkeypatch.setattr(obs, "MAX_COLUMNS", 47)
    with pytest.raises(InvalidSpec, match="obs needs a 48 x 48 Hessian per layer for the mlp .its experts are 48 "
                                          "input columns, more than 47.: choose wanda_sp") as refused:
        criteria.get("obs").score(model, _calibration(model))
    assert refused.value.field == "prune.criterion"
    monkeypatch.setattr(obs, "MAX_COLUMNS", 48)
    assert len(criteria.get("obs").score(model, _calibration(model))) == 3


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_stock_mixture_of_experts_is_laid_out_as_blocks_of_channels_computing_the_same(kind):
    """`canonical` turns each sparse block into a `MoEMLP` holding expert e's gate, up and down weights as channels
    [e·w, (e+1)·w) and its router row as row e; the logits and greedy generations are the stock model's."""
    model = tiny_model(kind)
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    router = model.model.layers[1].mlp.gate.weight.detach().clone()
    ids, want, want_tokens = _outputs(model)
    count = slicing.count_parameters(model)
    families.family_of(model)
    mlp = model.model.layers[1].mlp
    assert type(mlp).__name__ == "MoEMLP" and (mlp.num_experts, mlp.expert_width, mlp.top_k) == (6, 8, 2)
    assert torch.equal(mlp.router.weight, router)
    assert torch.equal(mlp.gate_proj.weight[16:24], gate_up[2, :8]) and torch.equal(mlp.up_proj.weight[16:24],
                                                                                    gate_up[2, 8:])
    assert torch.equal(mlp.down_proj.weight[:, 16:24], down[2])
    assert slicing.count_parameters(model) == count
    _, logits, tokens = _outputs(model, ids)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_layer_left_one_expert_is_that_expert_s_mlp_and_both_ways_of_running_experts_agree(kind):
    """top-k is capped at the experts kept: with one left, every token goes to it at weight 1 (a softmax over one
    logit), renormalised or not. Experts run one by one and as whole linears (when a hook watches) give the same."""
    model = tiny_model(kind)
    families.family_of(model)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    mlp = model.model.layers[0].mlp
    with torch.inference_mode():
        by_expert = mlp(x)
        handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: None)  # watched: as linears
        as_linears = mlp(x)
        handle.remove()
    torch.testing.assert_close(as_linears, by_expert, atol=1e-6, rtol=0)
    layout = slicing.dense_layout(model)
    layout = slicing.Layout((slicing.LayerLayout(layout.layers[0].attn_units, (4,)), *layout.layers[1:]),
                            mlp_unit="expert")
    slicing.slice_model(model, layout)
    one = model.model.layers[0].mlp
    assert (one.num_experts, one.router.weight.shape, one.gate_proj.weight.shape) == (1, (1, 32), (8, 32))
    with torch.inference_mode():
        expert = one.down_proj(one.act_fn(one.gate_proj(x)) * one.up_proj(x))
        torch.testing.assert_close(one(x), expert, atol=1e-6, rtol=0)


def test_a_qwen3_moe_with_dense_layers_among_the_sparse_ones_is_refused_clearly():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=8,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    with pytest.raises(InvalidSpec, match="dense MLP layers among the sparse ones .* is not supported") as refused:
        families.family_of(Qwen3MoeForCausalLM(config))
    assert refused.value.field == "model.source"
