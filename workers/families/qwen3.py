"""Qwen3: Llama's layout plus an RMSNorm over each head's queries and keys (`q_norm`, `k_norm`); their head_dim
weight is shared by every head, so cutting heads leaves it as it is. Layers may be sliding-window ones."""

from .base import Family

FAMILY = Family("qwen3", "Qwen3", "transformers.models.qwen3.modeling_qwen3", head_norms=True)
