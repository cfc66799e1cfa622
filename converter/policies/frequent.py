import torch

from .base import Policy


class Frequent(Policy):
    """Heavy hitters in a fixed budget per KV head (FastGen's C_frequent, H2O): the first n_sink
    positions, special tokens, the last `window` positions and the tokens with the highest mean
    attention received, `budget` cells in all.

    Which tokens survive depends on the attention history, so there is no static keep-set: the
    native store evicts at decode time and `reference.py` replays that rule exactly. `keep_rows`
    is the profiling estimate: for query i a key's score is the mean attention it received from
    the queries <= i (summed over the KV head's query group), and the top
    budget - n_sink - window candidates outside the sinks and the window are kept.
    """

    def __init__(self, budget: int, window: int):
        if window < 1 or budget <= window:
            raise ValueError(f"frequent needs budget > window >= 1, got budget {budget}, window {window}")
        self.budget, self.window = budget, window
        self.name = f"frequent{budget}+local{window}"

    def keep(self, ctx, attn=None):
        if attn is None:
            raise ValueError("the frequent policy depends on attention; use reference.logits for its exact rule")
        return self.keep_rows(ctx, attn, 0)

    def keep_rows(self, ctx, attn: torch.Tensor, q0: int) -> torch.Tensor:
        """attn [H, T, T] (per KV head) -> bool [H, T - q0, T] for the queries q0..T-1."""
        n = ctx.n
        d = ctx.distance()[q0:]                                     # [q, T]
        j = torch.arange(n)[None, :]
        seen = d.clamp(min=0) + 1
        score = attn.cumsum(dim=-2)[:, q0:, :] / seen.to(attn.dtype)
        base = (d >= 0) & ((j < ctx.n_sink) | ctx.special[None, :] | (d < self.window))
        cand = (d >= 0) & ~base
        k = min(n, max(0, self.budget - ctx.n_sink - self.window))
        top = score.masked_fill(~cand[None], float("-inf")).topk(k, dim=-1)
        hit = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
        return base[None] | hit
