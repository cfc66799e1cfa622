import math

import torch

from .base import Policy


class Frequent(Policy):
    """Heavy hitters: the ceil(ratio * T) keys with the largest accumulated attention (FastGen / H2O).

    Profiling form (as FastGen and Cold Compress do at the end of prefill): a key's score is its
    column sum of attention divided by the number of queries that can see it, and the top keys are
    kept for every query of the prompt. Needs the head's attention [H, T, T]; returns [H, T, T].
    Decode-time eviction by running scores belongs to the native store (not yet built).
    """

    def __init__(self, ratio: float = 0.3):
        self.ratio = ratio
        self.name = "frequent"

    def keep(self, ctx, attn=None):
        if attn is None:
            raise ValueError("the frequent policy needs attention probabilities")
        n = ctx.n
        seen_by = torch.arange(n, 0, -1, dtype=attn.dtype)  # key j is visible to n - j queries
        score = attn.sum(dim=-2) / seen_by                     # [H, T]
        k = max(1, math.ceil(self.ratio * n))
        top = score.topk(k, dim=-1).indices
        cols = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return ctx.causal()[None] & cols[:, None, :]
