"""Mistral: Mistral 7B, Ministral: a sliding window over every layer."""

from .base import Family

FAMILY = Family("mistral", "Mistral", "transformers.models.mistral.modeling_mistral")
