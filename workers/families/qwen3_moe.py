"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with a mixture of experts of width `moe_intermediate_size`
in every layer (`norm_topk_prob` says whether the chosen experts' weights are renormalised)."""

from .moe import MoEFamily

FAMILY = MoEFamily("qwen3_moe", "Qwen3Moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", head_norms=True,
                   width_key="moe_intermediate_size")
