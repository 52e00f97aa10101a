"""Llama: Llama, Llama 2, Llama 3.x, and models in its layout (SmolLM2, TinyLlama, DeepSeek-R1 distills)."""

from .base import Family

FAMILY = Family("llama", "Llama", "transformers.models.llama.modeling_llama")
