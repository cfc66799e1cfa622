from .base import Policy


class Local(Policy):
    """The most recent `window` positions (i - j < window), the query included."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"local window must be >= 1, got {window}")
        self.window = window
        self.name = f"local{window}"

    def keep(self, ctx, attn=None):
        d = ctx.distance()
        return (d >= 0) & (d < self.window)
