"""The model families darwinfront prunes, named once for the workers (transformers classes) and the API (GGUF files).

Torch-free: the API checks a submitted `.gguf` file against this list without importing transformers.
"""

from __future__ import annotations

# One per adapter module of `workers.families` (the registry there checks the two agree).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                           "Olmo2ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                           "GPTNeoXForCausalLM")
# GGUF `general.architecture` -> the transformers class a GGUF of it loads as (llama.cpp writes Mistral as
# `llama` too; transformers tells the two apart by the model name).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
assert set(GGUF_ARCHITECTURES.values()) <= set(SUPPORTED_ARCHITECTURES)


def unsupported(architecture: str) -> str:
    """The one message for a model darwinfront does not prune: its architecture and the supported ones."""
    return (f"architecture {architecture} is not supported; darwinfront prunes {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(docs/FAMILIES.md)")
