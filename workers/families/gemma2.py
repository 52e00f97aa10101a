"""Gemma 2: GeGLU MLP, norms before and after each sub-layer, soft-capped attention logits (passed to the
attention function) and final logits, sliding-window layers alternating with global ones, head_dim apart from
hidden / heads, tied embeddings scaled by sqrt(hidden). A removed sub-layer's zero output stays zero through the
norm after it, as the masked model's does."""

from .base import Family

FAMILY = Family("gemma2", "Gemma2", "transformers.models.gemma2.modeling_gemma2", softcap=True)
