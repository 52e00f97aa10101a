"""OLMoE: q/k norms over the whole query and key projections (as OLMo 2's, so a cut head cuts its rows of the
norm weight), norms before each sub-layer, and a mixture of experts in every layer (64 experts, 8 per token in
OLMoE-1B-7B)."""

from .moe import MoEFamily

FAMILY = MoEFamily("olmoe", "Olmoe", "transformers.models.olmoe.modeling_olmoe", projection_norms=True)
