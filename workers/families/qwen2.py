"""Qwen2: Qwen2, Qwen2.5: biases on q, k and v."""

from .base import Family

FAMILY = Family("qwen2", "Qwen2", "transformers.models.qwen2.modeling_qwen2")
