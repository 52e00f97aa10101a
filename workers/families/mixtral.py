"""Mixtral: Mistral's layer with a mixture of experts in place of the MLP (8 experts, 2 per token in
Mixtral-8x7B; the chosen experts' weights always renormalised), sliding window where the config sets one."""

from .moe import MoEFamily

FAMILY = MoEFamily("mixtral", "Mixtral", "transformers.models.mixtral.modeling_mixtral", always_normalize=True)
