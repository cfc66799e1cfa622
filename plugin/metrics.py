"""How close a compressed cache's next-token distributions are to the full cache's: the one
definition the converter's report, the evaluation and the tests use. numpy only (no torch, no
libllama), so any process may import it."""
from __future__ import annotations

import numpy as np


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(full, other, next_ids=None) -> dict:
    """Per position (rows of logits): KL(full || other) mean and 99th percentile, top-1 agreement,
    positions; with the tokens that followed (`next_ids`), the perplexity of `other` on them."""
    p, q = log_softmax(full), log_softmax(other)
    kl = (np.exp(p) * (p - q)).sum(-1)
    out = {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
           "top1": float((p.argmax(-1) == q.argmax(-1)).mean()), "n": int(len(kl))}
    if next_ids is not None:
        nxt = np.asarray(next_ids)
        out["ppl"] = float(np.exp(-q[np.arange(len(nxt)), nxt].mean()))
    return out
