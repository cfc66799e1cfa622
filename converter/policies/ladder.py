"""The hybrid ladder (FastGen Eq. 2), cheapest first, and the per-KV-head policy it yields.

special -> special+punct -> special+punct+local(w) for growing windows w -> full.
Windows are powers of two: per-head windows differ by more than an order of magnitude on real
models, and buckets keep the number of native cache classes small. The frequent rungs
(special+punct+frequent[+local]) are measured by the profiler but not selectable until the
native heavy-hitter store exists: a policy the runtime cannot execute must not be written.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .full import Full
from .local import Local
from .punct import Punct
from .special import Special


class Kind(IntEnum):
    """Stored in GGUF as fastgen.class.kind (schema version 1)."""

    FULL = 0
    SPECIAL = 1          # sinks + special tokens (+ the query itself)
    SPECIAL_PUNCT = 2    # ... + punctuation
    SPECIAL_PUNCT_LOCAL = 3  # ... + a recent window


KIND_NAMES = {Kind.FULL: "full", Kind.SPECIAL: "special", Kind.SPECIAL_PUNCT: "special+punct",
              Kind.SPECIAL_PUNCT_LOCAL: "special+punct+local"}


@dataclass(frozen=True, order=True)
class HeadPolicy:
    """What one KV head keeps. `window` is 1 for special and special+punct (the query itself)."""

    kind: Kind
    window: int = 0

    def policy(self):
        if self.kind == Kind.FULL:
            return Full()
        if self.kind == Kind.SPECIAL:
            return Special()
        if self.kind == Kind.SPECIAL_PUNCT:
            return Special() | Punct()
        return Special() | Punct() | Local(self.window)

    @property
    def label(self) -> str:
        if self.kind == Kind.SPECIAL_PUNCT_LOCAL:
            return f"{KIND_NAMES[self.kind]}{self.window}"
        return KIND_NAMES[self.kind]

    def cost(self, n_ctx: int, protected_frac: float, n_sink: int) -> float:
        """Expected cached tokens at context n_ctx (protected_frac: share of special+punct tokens)."""
        if self.kind == Kind.FULL:
            return float(n_ctx)
        protected = protected_frac * n_ctx if self.kind != Kind.SPECIAL else 0.0
        return min(float(n_ctx), n_sink + protected + self.window)


def ladder(max_window: int, min_window: int = 16) -> list[HeadPolicy]:
    """Rungs in the order they are tried: the first that recovers >= T of the attention wins."""
    rungs = [HeadPolicy(Kind.SPECIAL, 1), HeadPolicy(Kind.SPECIAL_PUNCT, 1)]
    w = min_window
    while w <= max_window:
        rungs.append(HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, w))
        w *= 2
    rungs.append(HeadPolicy(Kind.FULL))
    return rungs
