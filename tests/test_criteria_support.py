"""Shared builders for the criteria tests (no tests here): tiny config-built Llama models, surgery."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

torch.set_num_threads(1)

VOCAB = 256


def tiny_model(seed: int = 0, layers: int = 2, **config) -> LlamaForCausalLM:
    """A random-init GQA Llama in fp64: d = 64, H = 4, G = 2, h = 16, I = 128, vocab 256."""
    cfg = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="sdpa",  # eager takes its softmax in fp32; sdpa on CPU stays in fp64
    )
    cfg.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float64).eval()
    with torch.no_grad():  # larger than the 0.02 default init so that every unit matters visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LlamaRMSNorm):
                setattr(parent, name, ExactRMSNorm(child))
    return model


class ExactRMSNorm(nn.Module):
    """LlamaRMSNorm's arithmetic without its round trip through fp32, so fp64 tests see fp64 gradients."""

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def calibration(n: int = 16, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def group_rows(model, g: int, which: str) -> slice:
    """Row slice of KV group g in q_proj ("q") or k/v_proj ("kv"); also its o_proj column slice ("q")."""
    cfg = model.config
    h, r = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    return slice(g * r * h, (g + 1) * r * h) if which == "q" else slice(g * h, (g + 1) * h)


def permute_groups(model, layer: int, perm: list[int]) -> None:
    """Reorder one layer's KV groups in place: new group i is old group perm[i] (q/k/v rows, o columns)."""
    attn = model.model.layers[layer].self_attn

    def blocks(which: str) -> torch.Tensor:
        rows = [group_rows(model, g, which) for g in perm]
        return torch.cat([torch.arange(r.start, r.stop) for r in rows])

    q_idx, kv_idx = blocks("q"), blocks("kv")
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[q_idx])
        attn.k_proj.weight.copy_(attn.k_proj.weight[kv_idx])
        attn.v_proj.weight.copy_(attn.v_proj.weight[kv_idx])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_idx])
