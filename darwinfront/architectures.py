"""The model families darwinfront prunes, named once for the workers (transformers classes) and the API (GGUF files).

Torch-free: the API checks a submitted `.gguf` file against this list without importing transformers.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# GGUF `general.architecture` -> the transformers class a GGUF of it loads as (llama.cpp writes Mistral as
# `llama` too; transformers tells the two apart by the model name).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
assert set(GGUF_ARCHITECTURES.values()) <= set(SUPPORTED_ARCHITECTURES)
