"""Pruned models that stock transformers loads: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

`pruned_layers.py` and one `modeling_pruned_<family>.py` per supported family import only torch and transformers:
they are copied into every exported model directory. `export` (darwinfront side) writes such a directory from a
sliced model and reads one back; `model_card` writes its README.md.
"""
