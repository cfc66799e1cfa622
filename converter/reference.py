"""PyTorch reference of the compressed cache: HF attention restricted to what each head keeps.

Position/token policies (special, punct, local, full): the keep-set of query i depends only on
the tokens up to i and an evicted key never returns, so decoding through the compressed cache
equals one forward pass where every head's attention is masked with its keep-set ("strict"
semantics: the policy applies inside a ubatch too).

Frequent (heavy-hitter) heads depend on attention history: the run goes chunk by chunk with the
native ubatch sizes and replays the native store's rule (llama-kv-cache-fastgen-hh.h): before a
chunk of n tokens a head holding more than budget + EVICT_BATCH cells (counting the new ones)
drops back to `budget`, removing the lowest mean score (attention received, summed over the
group's query heads, divided by the queries that saw it; ties: older first); sinks and the
window stay, special tokens go last. Scores accumulate from this run's own softmax.

Static compressed classes live in native slices of a fixed number of cells (`cells`, read from the
native context: llama_fastgen_ctx_class_cells); when protected tokens outgrow it, the oldest go
(`ProtectedBudget`). Without `cells` the reference assumes room for everything, as the profile
report does. This is the oracle for the native cache and the quality estimate in the profile report.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from llama_fastgen.schema import FREQUENT_EVICT_BATCH, Kind

from .policies import HeadPolicy, TokenContext, to_policy

_NAME = "fastgen_reference"
_STATE: dict = {"replay": None}


class ProtectedBudget:
    """The native slice of one static compressed class (llama-kv-cache-fastgen.cpp, init_batch and
    evict_oldest_protected). A ubatch of n tokens at p0 needs n cells that are empty or hold a token
    outside the window that is not retained (sink or protected id); the window's cells and the
    retained ones below it are taken. When fewer are left, retained tokens from the last drop (at
    least the sinks) up to the window go, a quarter of that range at a time, until the ubatch fits:
    every query from p0 on loses them. One sequence, one ubatch per decode call (n_batch = n_ubatch),
    a cache that is not unified (llama-cpp-python's contexts unless embedding=True)."""

    ATTEMPTS = 8   # init_batch: of a non-unified cache only the equal split runs, with up to 8 drops

    def __init__(self, policy: HeadPolicy, cells: int, ctx: TokenContext):
        protected = ctx.special | ctx.punct if policy.kind in (Kind.SPECIAL_PUNCT, Kind.SPECIAL_PUNCT_LOCAL) else ctx.special
        self.retained = (protected | (torch.arange(ctx.n) < ctx.n_sink)).numpy()
        self.gone = np.zeros(ctx.n, dtype=bool)
        self.window, self.cells, self.n_sink, self.label = policy.window, cells, ctx.n_sink, policy.label
        self.upto = 0
        self.drops: list[tuple[int, int, int]] = []   # (p0, lo, cut) of each drop

    def taken(self, p0: int) -> int:
        lo_w = max(0, p0 - self.window + 1)
        return int((self.retained[:lo_w] & ~self.gone[:lo_w]).sum()) + (p0 - lo_w)

    def begin(self, p0: int, n: int) -> None:
        for _ in range(self.ATTEMPTS):
            if self.cells - self.taken(p0) >= n:
                return
            lo, hi = max(self.upto, self.n_sink), p0 - self.window
            if hi <= lo:
                break
            cut = lo + max(1, (hi - lo) // 4)
            self.gone[lo:cut] = True
            self.upto = cut
            self.drops.append((p0, lo, cut))
        if self.cells - self.taken(p0) < n:
            raise ValueError(f"class {self.label} ({self.cells} cells) has no room for a ubatch of {n} at "
                             f"position {p0}: the native cache refuses this batch too")


class Replay:
    """Per layer: static keep-sets per KV head, and the heavy-hitter cells of frequent heads.
    cells: native slice size per static class label (None: protected tokens never outgrow it)."""

    def __init__(self, policies: list[list[HeadPolicy]], ctx: TokenContext, cells: dict[str, int] | None = None):
        self.ctx = ctx
        n = ctx.n
        self.static, self.hh = [], []
        causal = ctx.causal()
        for row in policies:
            cache: dict = {}
            self.static.append(torch.stack([
                causal if p.kind == Kind.FREQUENT else cache.setdefault(p, to_policy(p).keep(ctx)) for p in row]))
            self.hh.append([(h, p) for h, p in enumerate(row) if p.kind == Kind.FREQUENT])
        static = {p for row in policies for p in row if p.kind not in (Kind.FULL, Kind.FREQUENT)}
        self.budgets = {p: ProtectedBudget(p, cells[p.label], ctx) for p in sorted(static)} if cells else {}
        self.budgeted = [[(h, self.budgets[p]) for h, p in enumerate(row) if p in self.budgets] for row in policies]
        self.alive = [torch.zeros(len(row), n, dtype=torch.bool) for row in policies]
        self.score = [torch.zeros(len(row), n, dtype=torch.float32) for row in policies]
        self.special = ctx.special.numpy()
        self.p0 = self.n = 0

    def begin(self, p0: int, n: int) -> None:
        """Evict where the native store would before a ubatch at p0 of n tokens, then place it."""
        self.p0, self.n = p0, n
        for b in self.budgets.values():
            b.begin(p0, n)
        pos = np.arange(p0)
        for l, heads in enumerate(self.hh):
            for h, p in heads:
                alive = self.alive[l][h]
                used = int(alive.sum())
                if used + n > p.budget + FREQUENT_EVICT_BATCH and used > p.budget:
                    a = alive[:p0].numpy()
                    cand = a & (pos >= self.ctx.n_sink) & (p0 - pos >= p.window)
                    idx = np.nonzero(cand)[0]
                    mean = self.score[l][h, idx].numpy() / (p0 - idx).astype(np.float32)
                    mean = np.where(np.isnan(mean), -np.inf, mean)
                    order = np.lexsort((idx, mean, self.special[idx]))
                    alive[idx[order[: min(len(idx), used - p.budget)]]] = False
                alive[p0:p0 + n] = True
                self.score[l][h, p0:p0 + n] = 0.0

    def mask(self, l: int) -> torch.Tensor:
        """bool [Hkv, n, P] for the current chunk's queries over keys 0..P-1."""
        p0, n = self.p0, self.n
        P = p0 + n
        m = self.static[l][:, p0:P, :P].clone()
        if self.hh[l]:
            causal = torch.arange(P)[None, :] <= torch.arange(p0, P)[:, None]
            for h, _ in self.hh[l]:
                m[h] = self.alive[l][h, :P][None, :] & causal
        for h, b in self.budgeted[l]:
            m[h, :, torch.from_numpy(b.gone[:P])] = False
        return m

    def accumulate(self, l: int, w: torch.Tensor, g: int) -> None:
        """w [Hq, n, P] probabilities of the chunk: add each key's attention to its head's score."""
        P = w.shape[-1]
        for h, _ in self.hh[l]:
            self.score[l][h, :P] += w[h * g:(h + 1) * g].float().sum(dim=(0, 1)).cpu()


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention plus the replayed keep masks; same math as transformers' eager path."""
    g = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(g, dim=1)
    value = value.repeat_interleave(g, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        m = attention_mask[:, :, :, : key.shape[-2]]
        w = w.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else w + m
    replay = _STATE["replay"]
    if replay is not None:
        keep = replay.mask(module.layer_idx).repeat_interleave(g, dim=0)
        w = w.masked_fill(~keep[None].to(w.device), float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if replay is not None:
        replay.accumulate(module.layer_idx, w[0], g)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(_NAME, _attention)
    try:  # transformers 5 also keeps a registry of mask builders per implementation
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, eager_mask)
    except ImportError:
        pass


@contextmanager
def compressed(model, replay: Replay | None):
    """Run `model` with attention restricted by `replay` (None: plain attention, same kernel)."""
    _register()
    old = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    _STATE["replay"] = replay
    try:
        yield model
    finally:
        _STATE["replay"] = None
        model.set_attn_implementation(old)


def has_frequent(policies) -> bool:
    return policies is not None and any(p.kind == Kind.FREQUENT for row in policies for p in row)


@torch.no_grad()
def logits(model, ids: list[int], policies, ctx: TokenContext | None, chunks: list[int] | int | None = None,
           last: int | None = None, cells: dict[str, int] | None = None, replay: Replay | None = None) -> torch.Tensor:
    """Logits [T, V] with the given per-KV-head policies (None: full cache); only the last `last`
    positions' when given (the LM head is then skipped elsewhere).

    chunks: the ubatch sizes of the native run (an int: that size repeated). Static policies give
    the same result for any chunking; frequent policies and `cells` need the native run's.
    cells: the native slice size per class label (Replay); replay: a Replay to run (and inspect after)."""
    dev = next(model.parameters()).device
    if replay is None and policies is not None:
        replay = Replay(policies, ctx, cells)
    if chunks is None:
        if replay is not None and (replay.budgets or any(replay.hh)):
            raise ValueError("frequent policies and slice budgets depend on the ubatch sizes: pass the native run's chunks")
        chunks = [len(ids)]
    elif isinstance(chunks, int):
        chunks = [chunks] * -(-len(ids) // chunks)
    out, p0 = [], 0
    cache = None
    need_from = 0 if last is None else len(ids) - last
    with compressed(model, replay):
        for n in chunks:
            n = min(n, len(ids) - p0)
            if n <= 0:
                break
            if replay is not None:
                replay.begin(p0, n)
            keep = max(0, p0 + n - max(p0, need_from))   # rows of this chunk whose logits are wanted
            kw = {} if keep == n else {"logits_to_keep": max(keep, 1)}
            if len(chunks) == 1:
                r = model(torch.tensor([ids], device=dev), use_cache=False, **kw)
            else:
                from transformers import DynamicCache

                cache = cache if cache is not None else DynamicCache()
                r = model(torch.tensor([ids[p0:p0 + n]], device=dev), past_key_values=cache, use_cache=True, **kw)
            if keep:
                out.append(r.logits[0, -keep:].float().cpu())
            p0 += n
    return torch.cat(out)


def compare(full: torch.Tensor, comp: torch.Tensor, start: int = 0) -> dict:
    """KL(full || compressed) per position, top-1 agreement, from `start` on (llama_fastgen.metrics)."""
    from llama_fastgen.metrics import agreement

    return agreement(full[start:].double().numpy(), comp[start:].double().numpy())