"""Prompt reuse for a compressed cache: checkpoints of the cache inside long prompts.

llama-cpp-python reuses the longest common prefix of the previous and the new prompt by removing
the rest of the old history (``kv_cache_seq_rm(-1, p0, -1)``). A compressed cache has evicted
tokens behind its windows and heavy-hitter budgets, so the native cache refuses a removal that starts
inside the history, and llama-cpp-python re-evaluates the whole prompt: a second question about the
same document costs the document again.

llama-server solves the same problem for sliding-window models with context checkpoints (saved states
of the part of the cache that cannot be rolled back, ``--ctx-checkpoints``); this is that, for
``Llama``: before the last ``LAST_CHUNKS`` chunks (of ``n_batch`` tokens) of every prompt evaluation
the sequence's cache state is saved in host memory. When the native cache refuses to remove
``[p0, ...)``, the newest checkpoint at ``b <= p0`` whose tokens are still the history is restored and
``[b, p0)`` is evaluated again, in the chunks a first evaluation from ``b`` makes. The cache then
holds exactly what a cache that evaluated the prompt only up to ``p0`` would hold, and the removal
succeeds: only ``p0 - b`` (under one chunk) plus the new tokens are evaluated instead of everything.

A checkpoint holds the compressed classes only (a partial state, as llama-server saves the
sliding-window part of a cache): the full heads drop the tail natively.

The native cache also drops its newest tokens itself when every class can take them back exactly
(tail rollback: windows whose cells before the cut are all there, heavy-hitter heads that keep each
recent token's attention, the kv override ``fastgen.undo_tokens``). An evaluation it can take back
saves no checkpoint: speculative decoding (``Llama(draft_model=...)``, which turns the override on)
then costs no state copies and no second evaluation of accepted drafts. When a removal is refused
where llama-cpp-python has already dropped the tail (a rejected draft) and no checkpoint fits, the
history is evaluated again from its start, so the cache never holds a tail llama-cpp-python dropped.

``LLAMA_FASTGEN_CHECKPOINTS`` (default 2) is how many checkpoints a ``Llama`` keeps; 0 turns them off.
"""
from __future__ import annotations

import ctypes
import os
import sys
import weakref
from dataclasses import dataclass

import numpy as np

LAST_CHUNKS = 2          # checkpoints before each of the last chunks of a prompt
ENV = "LLAMA_FASTGEN_CHECKPOINTS"
# tokens a Llama with a draft model can take back natively (kv override fastgen.undo_tokens): a
# step's sampled token and its drafts (llama-cpp-python's prompt lookup drafts 10 by default)
DRAFT_UNDO_TOKENS = 16


def max_checkpoints() -> int:
    v = os.environ.get(ENV, "2")
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{ENV}={v!r}: expected a number of checkpoints (0 turns them off)") from None
    if n < 0:
        raise ValueError(f"{ENV}={n}: expected 0 or more")
    return n


@dataclass
class Checkpoint:
    pos: int               # tokens [0, pos) are in the saved cache
    tokens: np.ndarray     # those tokens, to check the history still starts with them
    state: ctypes.Array


class Checkpoints:
    """The checkpoints of one Llama, newest last."""

    def __init__(self, llm, limit: int):
        self.llm = weakref.ref(llm)
        self.limit = limit
        self.items: list[Checkpoint] = []
        self.restored = 0      # how many refused removals were served by a checkpoint (for logs and tests)
        self.saved = 0         # how many checkpoints were saved

    @property
    def nbytes(self) -> int:
        return sum(len(c.state) for c in self.items)

    def save(self) -> None:
        import llama_cpp

        llm = self.llm()
        pos = llm.n_tokens
        if pos == 0 or self.limit == 0:
            return
        self.items = [c for c in self.items if c.pos < pos]  # a newer one at or beyond pos is stale
        # the compressed classes only (a partial state): the full ones drop a suffix natively
        ctx, partial = llm._ctx.ctx, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, partial)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data_ext(ctx, buf, size, 0, partial) != size:
            return  # nothing saved, nothing lost: a later refusal re-evaluates the prompt as before
        self.items.append(Checkpoint(pos, np.array(llm.input_ids[:pos]), buf))
        self.saved += 1
        del self.items[:-self.limit]

    def rollback(self, p0: int) -> bool:
        """Make the cache hold exactly tokens [0, p0) of the history; False when no checkpoint can."""
        import llama_cpp

        llm = self.llm()
        hist = llm.input_ids[:llm.n_tokens]
        if p0 > len(hist):
            return False
        for c in reversed(self.items):
            if c.pos <= p0 and np.array_equal(c.tokens, hist[:c.pos]):
                break
        else:
            if p0 < len(hist):
                return False   # a new prompt's prefix: llama-cpp-python evaluates the whole prompt again
            # the caller has dropped the tail already (Llama.generate rejecting a draft) and would go on
            # as if removed: the start of the history is the checkpoint of last resort
            c = Checkpoint(0, hist[:0], None)
        redo = hist[c.pos:p0].tolist()   # a copy: eval writes input_ids again
        ctx, partial = llm._ctx.ctx, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        # the compressed classes go back to c.pos; then the full ones drop their tail as usual
        restored = c.state is None or \
            llama_cpp.llama_state_seq_set_data_ext(ctx, c.state, len(c.state), 0, partial) == len(c.state)
        if not restored or not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, c.pos, -1):
            llm.reset()  # a refused state leaves the sequence empty (llama.cpp clears it)
            self.items.clear()
            return False
        llm.n_tokens = c.pos
        _orig_eval(llm, redo)
        self.items = [x for x in self.items if x.pos <= p0]
        self.restored += c.state is not None
        if llm.verbose:
            where = f"restored its checkpoint at {c.pos}" if c.state is not None else "no checkpoint fits"
            print(f"llama_fastgen: the compressed cache cannot drop positions from {p0} on; {where} and evaluated "
                  f"{len(redo)} tokens again", file=sys.stderr)
        return True


_by_ctx: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # LlamaContext -> Checkpoints
_orig_eval = None


def of(llm) -> Checkpoints | None:
    """The Llama's checkpoints; None when its cache can remove any suffix (no fastgen, or only full
    heads) or checkpoints are off."""
    ctx = llm._ctx
    if ctx not in _by_ctx:
        from ._lib import native
        from .schema import KIND_NAMES, Kind

        stats = native.cache_stats(llm)
        compressed = any(c["class"] != KIND_NAMES[Kind.FULL] for c in stats["classes"])
        n = max_checkpoints()
        _by_ctx[ctx] = Checkpoints(llm, n) if compressed and n > 0 else None
    return _by_ctx[ctx]


def _eval(self, tokens):
    """Llama.eval, with a checkpoint before each of the last LAST_CHUNKS chunks, unless the native cache
    can take the tokens back itself."""
    tokens = list(tokens)
    cps = of(self) if len(tokens) > 1 else None
    if cps is not None and len(tokens) <= self.n_batch:
        from ._lib import native

        if native.lib.llama_fastgen_ctx_make_removable(native.ffi.cast("void *", self._ctx.ctx), 0, len(tokens)):
            cps = None
    if cps is None:
        return _orig_eval(self, tokens)
    starts = list(range(0, len(tokens), self.n_batch))[-LAST_CHUNKS:]
    done = 0
    for s in starts:
        if s > done:   # whole chunks: llama-cpp-python splits them as one call would
            _orig_eval(self, tokens[done:s])
            done = s
        cps.save()
    _orig_eval(self, tokens[done:])


_warned_off = False


def _seq_rm(orig):
    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        global _warned_off
        if orig(self, seq_id, p0, p1):
            return True
        cps = _by_ctx.get(self)
        if cps is None and self in _by_ctx and not _warned_off:
            # llama-cpp-python ignores this refusal where it drops a rejected draft (Llama.generate with a
            # draft_model), and the next decode then fails: say why once
            print(f"llama_fastgen: the compressed cache cannot drop positions from {p0} on and checkpoints are "
                  f"off ({ENV}=0): prompts are evaluated again, and speculative decoding (draft_model) fails; "
                  f"set {ENV} to 1 or more", file=sys.stderr)
            _warned_off = True
        return bool(cps and seq_id in (-1, 0) and p1 < 0 and cps.rollback(p0))
    kv_cache_seq_rm._fastgen = True
    return kv_cache_seq_rm


def _init(orig):
    def __init__(self, *args, draft_model=None, kv_overrides=None, **kwargs):
        if draft_model is not None:   # rejected drafts leave natively (a fastgen GGUF; others ignore the key)
            from .schema import KEYS

            kv_overrides = {KEYS["UNDO_TOKENS"]: DRAFT_UNDO_TOKENS, **(kv_overrides or {})}
        orig(self, *args, draft_model=draft_model, kv_overrides=kv_overrides, **kwargs)
    __init__._fastgen = True
    return __init__


def install(llama_cpp) -> None:
    """Wrap Llama.__init__, Llama.eval and LlamaContext.kv_cache_seq_rm (once)."""
    global _orig_eval
    Llama, Ctx = llama_cpp.llama.Llama, llama_cpp._internals.LlamaContext
    if getattr(Llama.eval, "_fastgen", False):
        return
    _orig_eval = Llama.eval
    _eval._fastgen = True
    Llama.eval = _eval
    Llama.__init__ = _init(Llama.__init__)
    Ctx.kv_cache_seq_rm = _seq_rm(Ctx.kv_cache_seq_rm)
