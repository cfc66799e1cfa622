"""Shared pieces: the token context every policy reads, and the union of policies."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from llama_fastgen.schema import DEFAULT_N_SINK


@dataclass(frozen=True)
class TokenContext:
    """What a keep-set may depend on: the token ids, which of them are protected, the sinks."""

    ids: torch.Tensor          # int64 [T]
    special: torch.Tensor      # bool [T]: BOS/EOS/control tokens
    punct: torch.Tensor        # bool [T]: punctuation tokens
    n_sink: int = DEFAULT_N_SINK

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def causal(self) -> torch.Tensor:
        return torch.ones(self.n, self.n, dtype=torch.bool).tril()

    def distance(self) -> torch.Tensor:
        """i - j for query i (rows) and key j (columns)."""
        r = torch.arange(self.n)
        return r[:, None] - r[None, :]


class Policy:
    name = "policy"

    def keep(self, ctx: TokenContext, attn: torch.Tensor | None = None) -> torch.Tensor:
        """bool [T, T] (or [H, T, T] when it depends on a head's attention): may query i see key j."""
        raise NotImplementedError

    def __or__(self, other: "Policy") -> "Union":
        return Union(self, other)


class Union(Policy):
    def __init__(self, *parts: Policy):
        flat: list[Policy] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Union) else [p])
        self.parts = flat
        self.name = "+".join(p.name for p in flat)

    def keep(self, ctx, attn=None):
        out = self.parts[0].keep(ctx, attn)
        for p in self.parts[1:]:
            out = out | p.keep(ctx, attn)
        return out
