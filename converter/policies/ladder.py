"""The hybrid ladder (FastGen Eq. 2) and the per-KV-head policy it yields.

Rungs: special, special+punct, special+punct+local(w) and special+frequent(B)+local(B/4) for
powers of two, full. A head takes the cheapest rung that recovers >= T of its attention, the cost
being the cells the rung holds at a nominal context length (`HeadPolicy.cost`): the punct rungs
grow with the text, the frequent rung is a fixed budget, so the order depends on that length.
Windows and budgets are powers of two so that the native cache has few classes.
"""
from __future__ import annotations

from llama_fastgen.schema import DEFAULT_N_SINK, HeadPolicy, Kind, class_problem

from .frequent import Frequent
from .full import Full
from .local import Local
from .punct import Punct
from .special import Special

MIN_BUDGET = 64


def to_policy(hp: HeadPolicy):
    """The keep-set rule of a stored head policy (frequent: the profiling estimate of it)."""
    if hp.kind == Kind.FULL:
        return Full()
    if hp.kind == Kind.SPECIAL:
        return Special()
    if hp.kind == Kind.SPECIAL_PUNCT:
        return Special() | Punct()
    if hp.kind == Kind.FREQUENT:
        return Frequent(hp.budget, hp.window)
    return Special() | Punct() | Local(hp.window)


def frequent_rung(budget: int) -> HeadPolicy:
    return HeadPolicy(Kind.FREQUENT, max(1, budget // 4), budget)


def ladder(max_window: int, min_window: int = 16, frequent: bool = True, n_sink: int = DEFAULT_N_SINK) -> list[HeadPolicy]:
    """Every rung the profiler measures (selection orders them by cost); a frequent rung only where its
    budget leaves room for heavy hitters beside the sinks and its window (schema.class_problem)."""
    rungs = [HeadPolicy(Kind.SPECIAL, 1), HeadPolicy(Kind.SPECIAL_PUNCT, 1)]
    w = min_window
    while w <= max_window:
        rungs.append(HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, w))
        w *= 2
    b = MIN_BUDGET
    while frequent and b <= max_window:
        if class_problem(frequent_rung(b), n_sink) is None:
            rungs.append(frequent_rung(b))
        b *= 2
    rungs.append(HeadPolicy(Kind.FULL))
    return rungs
