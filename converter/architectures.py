"""Supported architectures and the head permutation that makes each policy class contiguous.

Permuting KV heads (and their query groups, o_proj columns and biases) inside a layer leaves the
function unchanged: RoPE is per head, GQA groups are contiguous in HF and ggml alike, and the
pinned converter's own Q/K rotary permutation is intra-head. Measured: logits agree to ~1e-6.
"""
from __future__ import annotations

import torch

# HF architectures whose heads the converter permutes (q/k/v/o, biases when present)
SUPPORTED = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",   # q_norm/k_norm act per head_dim, shared by heads: unaffected
}
REFUSED = {
    "Gemma2ForCausalLM": "its layers already use a sliding window (iSWA cache); not supported yet",
    "Gemma3ForCausalLM": "its layers already use a sliding window (iSWA cache); not supported yet",
    "Gemma3ForConditionalGeneration": "its layers already use a sliding window; not supported yet",
    "BloomForCausalLM": "ALiBi slopes depend on the head index, so heads cannot be permuted",
    "MptForCausalLM": "ALiBi slopes depend on the head index, so heads cannot be permuted",
}


class UnsupportedModel(ValueError):
    pass


def check(config) -> str:
    archs = getattr(config, "architectures", None) or []
    arch = archs[0] if archs else type(config).__name__
    if arch in SUPPORTED:
        return arch
    why = REFUSED.get(arch, "no head permutation is defined for it")
    raise UnsupportedModel(f"architecture {arch} is not supported: {why}. "
                           f"Supported: {', '.join(sorted(SUPPORTED))}")


def shape(config) -> tuple[int, int, int, int]:
    """(n_layer, n_head, n_head_kv, head_dim)."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return config.num_hidden_layers, n_head, n_kv, head_dim


@torch.no_grad()
def permute_heads(model, perms: list[list[int]]) -> None:
    """In place: layer l's new KV head h is its old KV head perms[l][h]."""
    n_layer, n_head, n_kv, d = shape(model.config)
    g = n_head // n_kv
    for l, perm in enumerate(perms):
        if sorted(perm) == list(range(n_kv)) and perm == sorted(perm):
            continue
        if sorted(perm) != list(range(n_kv)):
            raise ValueError(f"layer {l}: {perm} is not a permutation of {n_kv} KV heads")
        attn = model.model.layers[l].self_attn
        kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in perm])
        q_rows = torch.cat([torch.arange((h * g + j) * d, (h * g + j + 1) * d) for h in perm for j in range(g)])
        for proj, rows in ((attn.k_proj, kv_rows), (attn.v_proj, kv_rows), (attn.q_proj, q_rows)):
            proj.weight.copy_(proj.weight[rows])
            if proj.bias is not None:
                proj.bias.copy_(proj.bias[rows])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_rows])
