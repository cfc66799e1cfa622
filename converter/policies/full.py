from .base import Policy


class Full(Policy):
    """Every cached token (the ordinary cache)."""

    name = "full"

    def keep(self, ctx, attn=None):
        return ctx.causal()
