"""Several sequences in one context (issue 15): static policy classes with n_seq_max > 1, unified and
per-sequence layouts. Oracle: the PyTorch reference of the same eviction, per sequence; each sequence
of a joint run agrees with it as closely as the same sequence run alone in a one-sequence context.
(Joint and alone differ in which cells hold which tokens, so flash attention's f16 accumulation sums
in another order: up to 1e-3 relative in a unified cache, where the sequences' cells interleave.)"""
from __future__ import annotations


import numpy as np
import pytest

import llama_fastgen  # noqa: F401  (our libllama before llama_cpp loads its own)
import llama_cpp as lc
from llama_fastgen.evaluation import configs
from llama_fastgen.logits import several_sequences

N_TOK, PREFILL, WINDOW, UBATCH = 200, 120, 96, 16  # past every head's window: retention and eviction run


def _context(model, n_seq: int, unified: bool, n_ctx: int = 1024, ubatch: int = UBATCH):
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = n_ctx, 512, ubatch, n_seq, unified
    cp.n_threads = cp.n_threads_batch = 2
    ctx = lc.llama_init_from_model(model, cp)
    assert ctx, "context creation failed"
    return ctx


def _run(gguf, streams: list[list[int]], unified: bool, ubatch: int = UBATCH) -> list[np.ndarray]:
    """Prefill every stream's first PREFILL tokens in one batch, then decode one token of every
    stream per call; logits [N_TOK - PREFILL + 1, n_vocab] per stream (last prefill position on)."""
    return several_sequences(gguf, streams, PREFILL, unified, ubatch)


def _decode(ctx, items, model=None) -> list[np.ndarray]:
    """Decode (token, pos, seq) items as one batch; with the model, every item's logits (else none asked)."""
    batch = lc.llama_batch_init(len(items), 0, 1)
    try:
        batch.n_tokens = len(items)
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, model is not None
            batch.seq_id[i][0] = seq
        assert lc.llama_decode(ctx, batch) == 0
        if model is None:
            return []
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        return [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in range(len(items))]
    finally:
        lc.llama_batch_free(batch)


@pytest.fixture(scope="module")
def windowed(tiny_model_dir, tmp_path_factory):
    """Every head special + punct + a 96-token window (no heavy-hitter heads): one sequence's cells
    (padded to 256) cannot hold three sequences' windows, so a unified cache must size for all three."""
    g = configs.uniform_gguf(tiny_model_dir, WINDOW, 0.05, tmp_path_factory.mktemp("seq") / "w96.gguf")
    model = lc.llama_model_load_from_file(str(g).encode(), lc.llama_model_default_params())
    assert model
    yield g, model
    lc.llama_model_free(model)


def _references(model_dir, gguf, streams, chunks=None):
    """(reference with the GGUF's policies, full-cache reference) per stream, float32 PyTorch;
    chunks: the native run's ubatch sizes per sequence (heavy-hitter eviction runs per ubatch)"""
    import torch
    from transformers import AutoModelForCausalLM

    from llama_fastgen import schema
    from llama_fastgen.converter import reference
    from llama_fastgen.converter.profiling import token_context

    meta = schema.read(gguf)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for ids in streams:
        ctx = token_context(ids, set(meta.special_token_ids), set(meta.punct_token_ids), meta.n_sink)
        out.append((reference.logits(m, ids, meta.original_head_policies(), ctx, chunks).numpy()[PREFILL - 1:],
                    reference.logits(m, ids, None, None).numpy()[PREFILL - 1:]))
    return out


@pytest.mark.parametrize("unified", [True, False])
def test_static_classes_serve_several_sequences_like_one(windowed, tiny_model_dir, unified):
    gguf, _ = windowed
    rng = np.random.default_rng(3)
    streams = [[int(t) for t in rng.integers(10, 500, N_TOK)] for _ in range(3)]
    joint = _run(gguf, streams, unified)
    p99 = lambda a, b: float(np.quantile(np.abs(a - b).max(-1), 0.99))
    for s, (ids, (ref, full)) in enumerate(zip(streams, _references(tiny_model_dir, gguf, streams))):
        alone = _run(gguf, [ids], unified)[0]
        top1 = lambda a: float((a.argmax(-1) == ref.argmax(-1)).mean())
        assert top1(joint[s]) >= min(0.97, top1(alone) - 0.02), (s, top1(joint[s]), top1(alone))  # near-ties of a random model
        # as close to the reference as one sequence alone (f16 cells, another summation order)
        assert p99(joint[s], ref) <= 1.5 * p99(alone, ref) + 1e-3, (s, p99(joint[s], ref), p99(alone, ref))
        # and the window evicted: the full cache's logits are far away
        assert p99(full, ref) > 5 * p99(joint[s], ref), (s, p99(full, ref), p99(joint[s], ref))


@pytest.mark.parametrize("unified", [True, False])
def test_slices_are_sized_for_every_sequence_they_hold(windowed, unified):
    """A unified cache gives each sequence its sinks and window (llama.cpp's SWA cache does the
    same); a per-sequence layout gives each stream one sequence's cells. Native = schema formula."""
    from llama_fastgen import native, schema

    gguf, model = windowed
    meta = schema.read(gguf)
    for n_seq in (1, 2, 3):
        ctx = _context(model, n_seq, unified)
        try:
            cells = native.lib.llama_fastgen_ctx_class_cells(native.ffi.cast("void *", ctx), 0)
        finally:
            lc.llama_free(ctx)
        n_ctx = 1024 if unified else (1024 // n_seq + 255) // 256 * 256  # llama.cpp pads n_ctx_seq to 256
        assert cells == schema.class_capacity(meta, 0, n_ctx, UBATCH, n_seq if unified else 1), (n_seq, cells)


# ------------------------------------------------------------------ heavy-hitter heads, a store per sequence
HH_BUDGET = 48  # below PREFILL: every sequence's store evicts by its own scores


@pytest.fixture(scope="module")
def heavy(tiny_d32_model_dir, tmp_path_factory):
    """Every head special + frequent (48 cells: sinks, special tokens, an 8-token window, heavy hitters);
    heads of 32 dimensions: several sequences need the fused op"""
    from llama_fastgen import schema

    policy = schema.HeadPolicy(schema.Kind.FREQUENT, 8, HH_BUDGET)
    g = configs.uniform_gguf(tiny_d32_model_dir, 8, 0.05, tmp_path_factory.mktemp("seq") / "hh48.gguf", policy=policy)
    model = lc.llama_model_load_from_file(str(g).encode(), lc.llama_model_default_params())
    assert model
    yield g, model
    lc.llama_model_free(model)


@pytest.mark.parametrize("unified", [True, False])
def test_heavy_hitter_heads_serve_several_sequences_like_one(heavy, tiny_d32_model_dir, unified):
    """Each sequence evicts by the attention of its own queries: decoded together (one store per
    sequence, the ubatch split by sequence), every sequence gets the logits it gets alone in
    ubatches of the same size, and follows the PyTorch reference of the same eviction. Ubatches of
    15 tokens hold 5 of each of the three sequences (llama.cpp's equal split), so alone: 5."""
    gguf, _ = heavy
    rng = np.random.default_rng(5)
    streams = [[int(t) for t in rng.integers(10, 500, N_TOK)] for _ in range(3)]
    joint = _run(gguf, streams, unified, ubatch=15)
    chunks = [5] * (PREFILL // 5) + [1] * (N_TOK - PREFILL)
    p99 = lambda a, b: float(np.quantile(np.abs(a - b).max(-1), 0.99))
    for s, (ids, (ref, full)) in enumerate(zip(streams, _references(tiny_d32_model_dir, gguf, streams, chunks))):
        alone = _run(gguf, [ids], unified, ubatch=5)[0]
        # the same op on the same cells of the same store: the same numbers
        assert p99(joint[s], alone) <= 1e-4, (s, p99(joint[s], alone))
        assert float((joint[s].argmax(-1) == alone.argmax(-1)).mean()) == 1.0
        top1 = float((joint[s].argmax(-1) == ref.argmax(-1)).mean())
        assert top1 >= 0.97 and p99(joint[s], ref) <= 0.05 * p99(full, ref), (s, top1, p99(joint[s], ref), p99(full, ref))


def test_heavy_hitter_stores_are_per_sequence_in_bytes_and_refused_past_the_full_cache(heavy):
    """n stores take n times one store's bytes (C API); when they would take more than the full
    cache, the context is refused with the reason instead of allocating them."""
    from llama_fastgen import native, schema

    gguf, model = heavy
    sizes = {}
    for n_seq in (1, 2, 3):
        ctx = _context(model, n_seq, True)
        try:
            sizes[n_seq] = native.lib.llama_fastgen_ctx_class_bytes(native.ffi.cast("void *", ctx), 0)
        finally:
            lc.llama_free(ctx)
    assert sizes[2] == 2 * sizes[1] and sizes[3] == 3 * sizes[1], sizes
    meta = schema.read(gguf)
    assert all(sizes[n] == schema.kv_bytes(meta, 32, 1024, UBATCH, n_seq=n)[0] for n in sizes), sizes
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 256, 256, UBATCH, 64, True
    assert not lc.llama_init_from_model(model, cp)
    assert "more than the full cache" in native.last_error()


def test_a_token_of_two_sequences_is_refused_with_the_reason(heavy):
    """A heavy-hitter store is per sequence, so a token shared by two sequences has no cell: llama_decode
    fails, and the reason is the last error (llama_fastgen adds it to llama-cpp-python's decode error)."""
    from llama_fastgen import native

    gguf, model = heavy
    ctx = _context(model, 2, True)
    batch = lc.llama_batch_init(1, 0, 2)
    try:
        batch.n_tokens = 1
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 11, 0, 2, True
        batch.seq_id[0][0], batch.seq_id[0][1] = 0, 1
        native.lib.llama_fastgen_clear_error()
        assert lc.llama_decode(ctx, batch) != 0
        assert "a token of several sequences" in native.last_error() and "one sequence below n_seq_max" in native.last_error()
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)


def test_a_whole_sequence_is_copied_store_to_store(heavy):
    """llama-server copies a prompt's sequence to other slots (several completions): seq_cp of a whole
    sequence copies its heavy-hitter store; both then continue as the same sequence would."""
    gguf, model = heavy
    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(10, 500, N_TOK)]
    ctx = _context(model, 2, True)
    try:
        _decode(ctx, [(ids[p], p, 0) for p in range(PREFILL)])  # past the budget: the store has evicted
        mem = lc.llama_get_memory(ctx)
        lc.llama_memory_seq_cp(mem, 0, 1, -1, -1)
        assert lc.llama_memory_seq_pos_max(mem, 1) == PREFILL - 1
        for p in range(PREFILL, N_TOK):
            a, b = _decode(ctx, [(ids[p], p, 0), (ids[p], p, 1)], model)
            assert np.abs(a - b).max() <= 1e-5, p
    finally:
        lc.llama_free(ctx)
    alone = _run(gguf, [ids], True)[0]
    assert np.abs(alone[-1] - b).max() <= 1e-3  # and as the sequence decoded alone (other ubatches: near, not equal)


def test_a_whole_state_restores_only_into_as_many_sequences(heavy):
    """A whole saved state holds one heavy-hitter store per sequence of the context that saved it (the
    policy fingerprint does not cover n_seq_max): it restores into a context with as many sequences,
    equal to the original, and another count is refused with the reason and leaves the cache empty."""
    import ctypes

    from llama_fastgen import native

    gguf, model = heavy
    ids = [int(t) for t in np.random.default_rng(3).integers(10, 500, PREFILL)]
    src = _context(model, 2, True)
    try:
        _decode(src, [(ids[p], p, s) for s in range(2) for p in range(PREFILL)])  # both sequences
        size = lc.llama_state_get_size(src)
        buf = (ctypes.c_uint8 * size)()
        assert lc.llama_state_get_data(src, buf, size) == size
        want = _decode(src, [(ids[0], PREFILL, 1)], model)[0]
    finally:
        lc.llama_free(src)
    same = _context(model, 2, True)
    try:
        assert lc.llama_state_set_data(same, buf, size) == size
        assert np.abs(_decode(same, [(ids[0], PREFILL, 1)], model)[0] - want).max() <= 1e-6
    finally:
        lc.llama_free(same)
    one = _context(model, 1, True)
    try:
        assert lc.llama_state_set_data(one, buf, size) == 0
        assert "same n_seq_max" in native.last_error()
        assert lc.llama_memory_seq_pos_max(lc.llama_get_memory(one), 0) == -1
    finally:
        lc.llama_free(one)
