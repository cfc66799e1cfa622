"""Teacher-forced logits of a GGUF through our libllama: the one loop tests, eval and benchmarks share."""
from __future__ import annotations

from . import llama_cpp, native  # noqa: I001  (libllama before numpy: the other order segfaulted on the H200)

import numpy as np


def teacher_forced(model_path, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, decode_from: int | None = None,
                   **llama_kwargs):
    """Feed `ids` in ubatches of n_batch (from position `decode_from` on: one token per decode
    call, as generation does); return (logits [len(ids), n_vocab] float32, cache stats).

    Static policies apply inside a ubatch too, so for them the ubatch size changes nothing;
    frequent (heavy-hitter) heads evict between ubatches, so for them it is part of the rule.
    Extra keyword arguments go to llama_cpp.Llama (flash_attn, kv_overrides, type_k, ...)."""
    llama_kwargs.setdefault("verbose", False)
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, **llama_kwargs)
    try:
        split = len(ids) if decode_from is None else decode_from
        llm.eval(ids[:split])
        for t in ids[split:]:
            llm.eval([t])
        return np.array(llm.scores[: len(ids)], dtype=np.float32), native.cache_stats(llm)
    finally:
        llm.close()
