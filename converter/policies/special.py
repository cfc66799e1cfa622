from .base import Policy


class Special(Policy):
    """Special/control tokens, the first n_sink positions (attention sinks) and the query itself.

    The sinks are not in FastGen's paper; they cost n_sink cells and hold much of the mass of
    models without a BOS token (SmolLM2 adds none). A query always sees its own key: the
    native cache stores a token before attending, and a row with no key would be undefined.
    """

    name = "special"

    def keep(self, ctx, attn=None):
        d = ctx.distance()
        j = d.new_tensor(range(ctx.n))[None, :]
        return ctx.causal() & (ctx.special[None, :] | (j < ctx.n_sink) | (d == 0))
