"""RazorAttention's echo and induction probe (ICLR 2025).

A block of random tokens repeated several times: from the second copy on, a query token x at i
has earlier copies of itself at i - kL. Echo = attention mass on those copies; induction = mass on
the token after each copy (i - kL + 1), which is what an induction (copy) head attends to. Both
are means over the queries of the later copies, per query head. Random tokens carry no meaning,
so only heads that look up earlier context by content score: the heads that retrieval needs.
"""
from __future__ import annotations

import numpy as np
import torch

from .hooks import attention_maps
from .tasks import repeated_random


def vocab_sample(tok, special: set[int], n: int = 4000) -> list[int]:
    """Ordinary token ids to draw random blocks from (no special tokens, no byte pieces)."""
    ids = [i for i in range(min(len(tok), 32000)) if i not in special]
    step = max(1, len(ids) // n)
    return ids[step // 2::step][:n]


@torch.no_grad()
def scores(model, tok, special: set[int], *, block: int = 256, repeats: int = 4, seeds=(0, 1)) -> dict:
    """{'echo': [L, Hq], 'induction': [L, Hq]} averaged over `seeds` prompts."""
    n_layer = model.config.num_hidden_layers
    vocab = vocab_sample(tok, special)
    dev = next(model.parameters()).device
    echo = np.zeros((len(seeds), n_layer, model.config.num_attention_heads))
    ind = np.zeros_like(echo)
    for s, seed in enumerate(seeds):
        ids = repeated_random(vocab, block, repeats, seed)
        T = len(ids)
        q = torch.arange(block, T, device=dev)
        back = [(q - k * block) for k in range(1, repeats)]
        rows_e = torch.cat([q[b >= 0] for b in back])
        cols_e = torch.cat([b[b >= 0] for b in back])
        cols_i = cols_e + 1                              # the token after the copy (always < query)

        def on_layer(l, a):
            a = a.float()
            e = torch.zeros(a.shape[0], T - block, device=a.device)
            i = torch.zeros_like(e)
            # several earlier copies per query: add them into the query's row
            e.index_add_(1, rows_e - block, a[:, rows_e, cols_e])
            i.index_add_(1, rows_e - block, a[:, rows_e, cols_i])
            echo[s, l] = e.mean(1).cpu().numpy()
            ind[s, l] = i.mean(1).cpu().numpy()

        with attention_maps(model, on_layer):
            model(torch.tensor([ids], device=dev), use_cache=False)
    return {"echo": echo.mean(0), "induction": ind.mean(0)}
