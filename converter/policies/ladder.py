"""The hybrid ladder (FastGen Eq. 2), cheapest first, and the per-KV-head policy it yields.

special -> special+punct -> special+punct+local(w) for growing windows w -> full.
Windows are powers of two: per-head windows differ by more than an order of magnitude on real
models, and buckets keep the number of native cache classes small. The frequent rungs
(special+punct+frequent[+local]) are measured by the profiler but not selectable until the
native heavy-hitter store exists: a policy the runtime cannot execute must not be written.
"""
from __future__ import annotations

from llama_fastgen.schema import HeadPolicy, Kind

from .full import Full
from .local import Local
from .punct import Punct
from .special import Special


def to_policy(hp: HeadPolicy):
    """The keep-set rule of a stored head policy."""
    if hp.kind == Kind.FULL:
        return Full()
    if hp.kind == Kind.SPECIAL:
        return Special()
    if hp.kind == Kind.SPECIAL_PUNCT:
        return Special() | Punct()
    return Special() | Punct() | Local(hp.window)


def ladder(max_window: int, min_window: int = 16) -> list[HeadPolicy]:
    """Rungs in the order they are tried: the first that recovers >= T of the attention wins."""
    rungs = [HeadPolicy(Kind.SPECIAL, 1), HeadPolicy(Kind.SPECIAL_PUNCT, 1)]
    w = min_window
    while w <= max_window:
        rungs.append(HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, w))
        w *= 2
    rungs.append(HeadPolicy(Kind.FULL))
    return rungs
