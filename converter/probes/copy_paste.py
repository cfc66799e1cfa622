"""Wu et al.'s retrieval score ("Retrieval Head Mechanistically Explains Long-Context Factuality").

On needle prompts the full model answers, the answer is fed teacher-forced (it equals the greedy
answer, which is checked); for each answer token, a query head scores when its strongest attention
falls inside the needle on a token equal to the one being produced: it is copying the fact. The
score is the share of answer tokens copied, averaged over the prompts the model answers.
"""
from __future__ import annotations

import numpy as np
import torch

from .hooks import attention_maps
from .tasks import NeedlePrompt


@torch.no_grad()
def scores(model, prompts: list[NeedlePrompt]) -> tuple[np.ndarray, list[bool]]:
    """([L, Hq] share of answer tokens each query head copied from the needle, answered flags).
    Prompts the model gets wrong contribute nothing (their copying is not retrieval)."""
    dev = next(model.parameters()).device
    n_layer, n_head = model.config.num_hidden_layers, model.config.num_attention_heads
    total = np.zeros((n_layer, n_head))
    ok_flags, used = [], 0
    for p in prompts:
        ids = p.ids + p.answer
        qpos = torch.arange(len(p.ids) - 1, len(ids) - 1)         # queries that produce the answer
        produced = torch.tensor(ids)[qpos + 1]
        t = torch.tensor(ids)
        hits = {}

        def on_layer(l, a):
            j = a[:, qpos, :].argmax(-1).cpu()                  # [Hq, n_answer]
            inside = (j >= p.span[0]) & (j < p.span[1])
            hits[l] = (inside & (t[j] == produced[None])).float().mean(1).numpy()

        with attention_maps(model, on_layer):
            logits = model(torch.tensor([ids], device=dev), use_cache=False).logits[0]
        ok = bool((logits[qpos].argmax(-1).cpu() == produced).all())
        ok_flags.append(ok)
        if ok:
            total += np.stack([hits[l] for l in range(n_layer)])
            used += 1
    return total / max(used, 1), ok_flags
