"""Teacher-forced logits of a GGUF through our libllama: the one loop tests, eval and benchmarks share."""
from __future__ import annotations

import numpy as np

from . import llama_cpp, native


def teacher_forced(model_path, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, **llama_kwargs):
    """Feed `ids` in ubatches of n_batch; return (logits [len(ids), n_vocab] float32, cache stats).

    The compressed cache applies its policy inside a ubatch too, so this equals decoding token by
    token (up to float noise). Extra keyword arguments go to llama_cpp.Llama (flash_attn,
    kv_overrides, type_k, n_gpu_layers, ...)."""
    llama_kwargs.setdefault("verbose", False)
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, **llama_kwargs)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32), native.cache_stats(llm)
    finally:
        llm.close()
