"""Helpers shared by tests: llama.cpp logits through llama-cpp-python with our library."""
from __future__ import annotations

import numpy as np


def llama_logits(gguf, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, flash_attn: bool = False,
                 **kw) -> np.ndarray:
    import llama_fastgen  # noqa: F401  (selects our libllama)
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                verbose=False, flash_attn=flash_attn, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()
