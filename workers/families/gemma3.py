"""Gemma 3 (text, `Gemma3ForCausalLM`): Gemma 2's layout with per-head q/k norms instead of attention soft-capping,
and five sliding-window layers to each global one, each kind with its own rotary base."""

from .base import Family

FAMILY = Family("gemma3", "Gemma3", "transformers.models.gemma3.modeling_gemma3", head_norms=True)
