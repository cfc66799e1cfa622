from .base import Policy


class Punct(Policy):
    """Punctuation tokens ('.', ',', ':', '?', newlines...): ids listed in the GGUF."""

    name = "punct"

    def keep(self, ctx, attn=None):
        return ctx.causal() & ctx.punct[None, :]
