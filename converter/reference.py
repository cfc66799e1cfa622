"""PyTorch reference of the compressed cache: HF attention restricted to each head's keep-set.

For the position/token policies (special, punct, local, full) the keep-set of query i depends
only on the tokens up to i, and an evicted key never returns. So teacher-forced decoding through
the compressed cache, token by token, equals ONE forward pass where every head's attention is
masked with its keep-set ("strict" semantics: the policy applies inside a ubatch too). This is
the oracle for the native cache and the first quality estimate in the profile report.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .architectures import shape
from .policies import HeadPolicy, TokenContext, to_policy

_NAME = "fastgen_reference"
_STATE: dict = {"masks": None}


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention plus a per-head keep mask; same math as transformers' eager path."""
    g = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(g, dim=1)
    value = value.repeat_interleave(g, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        m = attention_mask[:, :, :, : key.shape[-2]]
        w = w.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else w + m
    masks = _STATE["masks"]
    if masks is not None and masks[module.layer_idx] is not None:
        w = w.masked_fill(~masks[module.layer_idx][None].to(w.device), float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(_NAME, _attention)
    try:  # transformers 5 also keeps a registry of mask builders per implementation
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, eager_mask)
    except ImportError:
        pass


def keep_masks(policies: list[list[HeadPolicy]], ctx: TokenContext, n_head: int) -> list[torch.Tensor]:
    """Per layer, bool [Hq, T, T]: the KV head's keep-set repeated for its query group."""
    out = []
    for row in policies:
        g = n_head // len(row)
        cache: dict = {}
        per_kv = [cache.setdefault(p, to_policy(p).keep(ctx)) for p in row]
        out.append(torch.stack(per_kv).repeat_interleave(g, dim=0))
    return out


@contextmanager
def compressed(model, masks: list[torch.Tensor] | None):
    """Run `model` with attention restricted to `masks` (None: plain attention, same kernel)."""
    _register()
    old = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    _STATE["masks"] = masks
    try:
        yield model
    finally:
        _STATE["masks"] = None
        model.set_attn_implementation(old)


@torch.no_grad()
def logits(model, ids: list[int], policies, ctx: TokenContext | None) -> torch.Tensor:
    """Logits [T, V] with the given per-KV-head policies (None: full cache)."""
    n_head = shape(model.config)[1]
    masks = keep_masks(policies, ctx, n_head) if policies is not None else None
    with compressed(model, masks):
        dev = next(model.parameters()).device
        return model(torch.tensor([ids], device=dev), use_cache=False).logits[0].float().cpu()


def compare(full: torch.Tensor, comp: torch.Tensor, start: int = 0) -> dict:
    """KL(full || compressed) per position, top-1 agreement, from `start` on."""
    p = torch.log_softmax(full[start:].double(), -1)
    q = torch.log_softmax(comp[start:].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).numpy()
    top1 = (full[start:].argmax(-1) == comp[start:].argmax(-1)).double().numpy()
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
            "top1": float(top1.mean()), "n": int(len(kl))}
