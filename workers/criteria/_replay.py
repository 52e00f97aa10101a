"""Restart a forward pass at decoder layer l from cached dense inputs.

Ablation and SPSA change one layer's gates at a time, so everything below that layer is the dense forward. A
`Replay` records, per micro-batch, each decoder layer's input hidden states and the keyword arguments the model
passed it (causal mask, rotary embeddings, ...), captured with forward pre-hooks; `logits(start)` then runs only
layers start.. plus the final norm and LM head. Hooks on o_proj / down_proj (gates) act during the replay as in
a full forward. Reads the layers, final norm and LM head where the model's family adapter names them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from workers import families
from workers.criteria._common import decoder_layers, micro_batches, model_device


class Replay:
    """Cached dense layer inputs of `calibration` (N, T), one entry per micro-batch of `batch_size` sequences."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.layers = decoder_layers(model)
        self.norm = families.family_of(model).final_norm(model)
        self.batches: list[tuple[torch.Tensor, list[tuple[torch.Tensor, dict]]]] = []
        for ids in micro_batches(calibration, batch_size):
            ids = ids.to(model_device(model))
            self.batches.append((ids, self._capture(ids)))

    def _capture(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
        seen: list[tuple[torch.Tensor, dict]] = []

        def grab(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            seen.append((hidden.detach(), rest))

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad():
                self.model.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        assert len(seen) == len(self.layers), (len(seen), len(self.layers))
        return seen

    def logits(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, logits (B, T, vocab) at least fp32) per micro-batch, running decoder layers `start`.. only."""
        if not 0 <= start < len(self.layers):
            raise ValueError(f"start layer {start} outside 0..{len(self.layers) - 1}")
        with torch.no_grad():
            for ids, inputs in self.batches:
                hidden, _ = inputs[start]
                for layer, (_, kwargs) in zip(self.layers[start:], inputs[start:], strict=True):
                    out = layer(hidden, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out  # (B, T, d)
                logits = self.model.lm_head(self.norm(hidden))  # (B, T, vocab)
                yield ids, logits.to(torch.promote_types(logits.dtype, torch.float32))
