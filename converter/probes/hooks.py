"""Per-layer attention maps without keeping them: a forward hook hands each layer's probabilities
[Hq, T, T] to a callback and drops them (a full stack of maps would not fit at long contexts)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def attention_maps(model, on_layer):
    """Within the block, every forward calls on_layer(layer_idx, probs[Hq, T, T]) per layer.
    The model must run with attn_implementation='eager' so the probabilities exist."""

    def hook(module, args, output):
        w = output[1]
        if w is None:
            raise RuntimeError("attention weights are missing: load the model with attn_implementation='eager'")
        on_layer(module.layer_idx, w[0])
        return (output[0], None) + tuple(output[2:])

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
