"""Helpers shared by tests: llama.cpp logits through llama-cpp-python with our library."""
from __future__ import annotations

import numpy as np


def llama_logits(gguf, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, flash_attn: bool = False,
                 **kw) -> np.ndarray:
    from llama_fastgen.logits import teacher_forced

    return teacher_forced(gguf, ids, n_ctx=n_ctx, n_batch=n_batch, flash_attn=flash_attn, **kw)[0]


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()
