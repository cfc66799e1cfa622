"""FastGen's KV policies, one per module, and the hybrid ladder built from them.

Every policy answers one question: given the tokens of a sequence, which cached keys j may
query i attend to? (`keep(ctx) -> bool[T, T]`, always causal). Hybrids are unions. Keep-sets of
special, punct, local and full depend only on positions and token ids, so the same rule runs in
the profiler, in the PyTorch reference and in the native cache. Frequent depends on attention
history: the profiler estimates it, the reference replays the native eviction.
"""
from .base import Policy, TokenContext, Union
from .frequent import Frequent
from .full import Full
from .local import Local
from .punct import Punct
from .special import Special
from .ladder import HeadPolicy, Kind, frequent_rung, ladder, to_policy

__all__ = ["Policy", "TokenContext", "Union", "Frequent", "Full", "Local", "Punct", "Special",
           "Kind", "HeadPolicy", "frequent_rung", "ladder", "to_policy"]
