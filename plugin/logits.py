"""Teacher-forced logits of a GGUF through our libllama: the one loop tests, eval and benchmarks share."""
from __future__ import annotations

from . import llama_cpp, native  # noqa: I001  (libllama before numpy: the other order segfaulted on the H200)

import numpy as np


def teacher_forced(model_path, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, decode_from: int | None = None,
                   **llama_kwargs):
    """Feed `ids` in ubatches of n_batch (from position `decode_from` on: one token per decode
    call, as generation does); return (logits [len(ids), n_vocab] float32, cache stats).

    Static policies apply inside a ubatch too, so for them the ubatch size changes nothing;
    frequent (heavy-hitter) heads evict between ubatches, so for them it is part of the rule.
    Extra keyword arguments go to llama_cpp.Llama (flash_attn, kv_overrides, type_k, ...)."""
    llama_kwargs.setdefault("verbose", False)
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                          logits_all=True, **llama_kwargs)
    try:
        split = len(ids) if decode_from is None else decode_from
        llm.eval(ids[:split])
        for t in ids[split:]:
            llm.eval([t])
        return np.array(llm.scores[: len(ids)], dtype=np.float32), native.cache_stats(llm)
    finally:
        llm.close()


def several_sequences(model_path, streams: list[list[int]], prefill: int, unified: bool = True, n_ubatch: int = 16,
                      n_ctx: int = 1024, n_gpu_layers: int = 0, n_threads: int = 2) -> list[np.ndarray]:
    """Several sequences in one context (n_seq_max = len(streams)): every stream's first `prefill`
    tokens in one batch, then one token of every stream per decode call. Returns per stream the
    logits [len - prefill + 1, n_vocab] from the last prefill position on. llama.cpp splits the batch
    into ubatches of n_ubatch tokens, equally by sequence where the cache asks for it."""
    lc = llama_cpp
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise RuntimeError(f"cannot load {model_path}")
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, max(512, len(streams) * prefill), n_ubatch
    cp.n_seq_max, cp.kv_unified = len(streams), unified
    cp.n_threads = cp.n_threads_batch = n_threads
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError(f"context creation failed: {native.last_error()}")
    batch = lc.llama_batch_init(max(512, len(streams) * prefill), 0, len(streams))
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    def decode(items):  # (token, pos, seq) -> logits of every item
        batch.n_tokens = len(items)
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, True
            batch.seq_id[i][0] = seq
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in range(len(items))]

    try:
        out = [[] for _ in streams]
        logits = decode([(ids[p], p, s) for s, ids in enumerate(streams) for p in range(prefill)])
        for s in range(len(streams)):
            out[s].append(logits[(s + 1) * prefill - 1])
        for p in range(prefill, min(len(ids) for ids in streams)):
            for s, lg in enumerate(decode([(ids[p], p, s) for s, ids in enumerate(streams)])):
                out[s].append(lg)
        return [np.stack(o) for o in out]
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def with_rolled_back_tails(model_path, ids: list[int], prefill: int, n_accepted: int, n_ctx: int = 2048,
                           n_batch: int = 64, seed: int = 0, ahead: bool = True, **llama_kwargs):
    """Tail rollback against its oracle. After a prefill of ids[:prefill], steps as speculative decoding
    and an edited chat turn make them: the next 1-4 tokens of `ids` plus 1-5 wrong ones, evaluated in
    one call or token by token, then the wrong ones removed again (llama_memory_seq_rm) in a first
    cache; a second cache evaluates only the right tokens, in the same calls. A step the first cache
    says it could not take back evaluates the right tokens only. Before every step both caches run the
    eviction a ubatch of the step's tokens would run (llama_fastgen_ctx_make_removable, as
    llama_fastgen.checkpoints does before an evaluation), so that their histories stay alike. With
    ahead=False the first cache does not: its steps evict as they run (as in llama-server, which knows
    nothing of make_removable), and the removal must still succeed and leave the same cache.
    Returns (logits of the right tokens in the first cache, in the second [n_accepted, n_vocab],
    steps rolled back, removals refused). Extra keyword arguments go to both llama_cpp.Llama."""
    import random

    llama_kwargs.setdefault("verbose", False)
    kw = dict(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True, **llama_kwargs)
    a, b = llama_cpp.Llama(**kw), llama_cpp.Llama(**kw)
    rm = llama_cpp.llama_memory_seq_rm
    try:
        a.eval(ids[:prefill])
        b.eval(ids[:prefill])
        rng, pos, end, rolled, refused = random.Random(seed), prefill, prefill + n_accepted, 0, 0
        while pos < end:
            acc = ids[pos:min(end, pos + rng.randint(1, 4))]
            wrong = [rng.randrange(100, a.n_vocab()) for _ in range(rng.randint(1, 5))]
            n = len(acc) + len(wrong)
            native.lib.llama_fastgen_ctx_make_removable(native.ffi.cast("void *", b._ctx.ctx), 0, n)
            if not ahead or native.lib.llama_fastgen_ctx_make_removable(native.ffi.cast("void *", a._ctx.ctx), 0, n):
                if rng.random() < 0.5 or not ahead:   # token by token, an eviction would come after some of them
                    a.eval(acc + wrong)
                else:
                    for t in acc + wrong:
                        a.eval([t])
                if rm(llama_cpp.llama_get_memory(a._ctx.ctx), 0, pos + len(acc), -1):
                    rolled += 1
                else:   # not expected: the caller checks refused == 0; go on as the second cache
                    refused += 1
                    a.reset()
                    a.eval(ids[:pos + len(acc)])
                a.n_tokens = pos + len(acc)
            else:
                a.eval(acc)
            b.eval(acc)
            pos += len(acc)
        return (np.array(a.scores[prefill:end], dtype=np.float32), np.array(b.scores[prefill:end], dtype=np.float32),
                rolled, refused)
    finally:
        a.close()
        b.close()
