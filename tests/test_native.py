"""Native per-class cache: oracles are the same GGUF with fastgen off, the PyTorch reference of
the same keep-sets, and the byte formula of the policy table."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llama_fastgen
from helpers import llama_logits
from llama_fastgen import schema
from llama_fastgen.logits import teacher_forced
from llama_fastgen.schema import Kind
from llama_fastgen.converter import convert, gguf_export, reference
from llama_fastgen.converter.profiling import token_context
from llama_cpp import Llama


@pytest.fixture(scope="module")
def real_fastgen_gguf(model_dir, tmp_path_factory):
    """The default model profiled at T = 0.95 (f32 weights, so only the cache differs)."""
    out = tmp_path_factory.mktemp("real") / "smollm2-fg.gguf"
    assert convert.main([str(model_dir), "--profile", "--outfile", str(out), "--outtype", "f32",
                         "--threshold", "0.95", "--max-tokens", "512", "--no-quality", "--no-retrieval"]) == 0
    return out


@pytest.fixture(scope="module")
def static_fastgen_gguf(model_dir, tmp_path_factory):
    """The same profile without the heavy-hitter rungs: every keep-set is a static rule."""
    out = tmp_path_factory.mktemp("static") / "smollm2-fg-static.gguf"
    assert convert.main([str(model_dir), "--profile", "--outfile", str(out), "--outtype", "f32",
                         "--threshold", "0.95", "--max-tokens", "512", "--no-quality", "--no-frequent",
                         "--no-retrieval"]) == 0
    return out


def test_all_full_policy_equals_fastgen_off(tiny_model_dir, tmp_path, long_ids):
    out = tmp_path / "tiny-full.gguf"
    assert convert.main([str(tiny_model_dir), "--profile", "--outfile", str(out), "--outtype", "f32",
                         "--threshold", "1.0", "--max-tokens", "128", "--no-quality", "--no-retrieval"]) == 0
    meta = schema.read(out)
    assert [c.label for c in meta.classes] == ["full"]
    ids = long_ids[:400]
    on = llama_logits(out, ids, flash_attn=True)
    off = llama_logits(out, ids, flash_attn=True, kv_overrides={"fastgen.enable": False})
    assert np.array_equal(on, off)


def _used_after(n_tokens, chunk, budget):
    """Cells a frequent head holds after n_tokens in ubatches of `chunk` (the eviction trigger)."""
    used = 0
    for p0 in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - p0)
        if used + n > budget + schema.FREQUENT_EVICT_BATCH and used > budget:
            used = budget
        used += n
    return used


def _reference(model_dir, gguf, ids, chunks, n_ctx, replay=None):
    """(reference of the keep-sets a native context of n_ctx cells runs, full-cache reference)"""
    import torch
    from transformers import AutoModelForCausalLM

    meta = schema.read(gguf).at_context(n_ctx)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ctx = token_context(ids, set(meta.special_token_ids), set(meta.punct_token_ids), meta.n_sink)
    ref = reference.logits(m, ids, meta.original_head_policies(), ctx, chunks=chunks,
                           replay=replay(meta.original_head_policies(), ctx) if replay else None).numpy()
    return ref, reference.logits(m, ids, None, None).numpy()


def _agrees(nat, ref, full):
    top1 = (nat.argmax(-1) == ref.argmax(-1)).mean()
    assert top1 >= 0.99, f"top-1 agreement with the reference {top1:.4f}"
    # Per-position max |diff|, 99th percentile: f16 KV cells vs fp32 PyTorch. (A few positions
    # differ by up to ~2.5 on this text; stock llama.cpp with the full cache differs from HF by the
    # same amount there, so the tail is precision, not policy.) Measured: p99 0.12-0.22, mean 0.004.
    err = np.abs(nat - ref).max(-1)
    assert np.abs(nat - ref).mean() < 0.02 and np.quantile(err, 0.99) < 0.5
    # and the eviction really happened: against the full cache the logits move far more
    assert np.quantile(np.abs(nat - full).max(-1), 0.99) > 3 * np.quantile(err, 0.99)


@pytest.mark.parametrize("which", ["static", "frequent"])
def test_native_cache_matches_pytorch_reference(which, real_fastgen_gguf, static_fastgen_gguf, model_dir, long_ids):
    """>= 1,000 teacher-forced positions past every window and budget, ubatches of 64: the static
    profile (no heavy hitters) and the full ladder, whose frequent heads evict by attention score."""
    gguf = real_fastgen_gguf if which == "frequent" else static_fastgen_gguf
    meta = schema.read(gguf)
    kinds = {c.kind for c in meta.classes}
    assert (Kind.FREQUENT in kinds) == (which == "frequent") and kinds != {Kind.FULL}
    start = 1 + max(max(c.window, c.budget) for c in meta.classes) + 64
    assert len(long_ids) - start >= 1000
    nat, st = teacher_forced(gguf, long_ids, n_ctx=2048, n_batch=64)
    ref, full = _reference(model_dir, gguf, long_ids, 64, 2048)
    _agrees(nat[start:], ref[start:], full[start:])
    for c in st["classes"]:  # frequent stores were full and evicted down to the budget
        cls = next(k for k in meta.classes if k.label == c["class"])
        if cls.kind == Kind.FREQUENT:
            # one store for all frequent classes: every head gets the largest capacity
            cap = max(k.budget for k in meta.classes) + max(64, schema.FREQUENT_EVICT_BATCH)
            assert c["used"] == _used_after(len(long_ids), 64, cls.budget) and c["cells"] == cap


def test_frequent_heads_decoded_token_by_token_match_the_reference(real_fastgen_gguf, model_dir, long_ids):
    """Decode one token per llama_decode: eviction every 32 tokens, scores from single queries."""
    ids = long_ids[:560]
    nat, _ = teacher_forced(real_fastgen_gguf, ids, n_ctx=1024, n_batch=1)
    ref, full = _reference(model_dir, real_fastgen_gguf, ids, 1, 1024)
    meta = schema.read(real_fastgen_gguf)
    start = 1 + max(c.budget for c in meta.classes) + 32
    _agrees(nat[start:], ref[start:], full[start:])


def _logits_in_subprocess(gguf, ids, n_batch, env, tmp_path, flash_attn=False):
    """teacher_forced in a fresh process: the LLAMA_FASTGEN_* switches are read once per process."""
    out = tmp_path / ("logits-%d-%d-%s.npy" % (n_batch, flash_attn, "-".join(f"{k}={v}" for k, v in sorted(env.items()))))
    code = ("import sys, numpy as np; from llama_fastgen.logits import teacher_forced; "
            f"np.save(sys.argv[1], teacher_forced(sys.argv[2], {list(ids)!r}, n_ctx=1024, n_batch={n_batch}, "
            f"flash_attn={flash_attn})[0])")
    subprocess.run([sys.executable, "-c", code, str(out), str(gguf)], check=True, env={**os.environ, **env})
    return np.load(out)


@pytest.mark.parametrize("n_batch", [1, 64])
def test_fused_heavy_hitter_op_equals_the_composed_ggml_path(n_batch, real_fastgen_gguf, long_ids, tmp_path, model_dir):
    """GGML_OP_FASTGEN_HH_ATTN against the composed ggml ops it replaces (LLAMA_FASTGEN_HH_FUSED=0),
    evictions included: decode (one token, 3 query rows per head: heads over threads) and prefill
    ubatches of 64 (192 rows: rows over threads, a barrier, then the store written); and against the
    PyTorch reference in ubatches of 8 (24 query rows per head on this model)."""
    meta = schema.read(real_fastgen_gguf)
    start = 1 + max(c.budget for c in meta.classes) + 64
    ids = long_ids[: start + 300]
    fused = _logits_in_subprocess(real_fastgen_gguf, ids, n_batch, {}, tmp_path)
    composed = _logits_in_subprocess(real_fastgen_gguf, ids, n_batch, {"LLAMA_FASTGEN_HH_FUSED": "0"}, tmp_path)
    # not the same code: the composed mul_mat rounds queries to f16 on the CPU, the fused op does not
    assert not np.array_equal(fused, composed)
    assert (fused.argmax(-1) == composed.argmax(-1)).mean() >= 0.99
    err = np.abs(fused - composed).max(-1)  # measured (decode): mean 0.003, p99 0.035
    assert np.abs(fused - composed).mean() < 0.01 and np.quantile(err, 0.99) < 0.15
    if n_batch != 1:
        return
    # several tokens per ubatch (eviction between ubatches of 8): the reference of the same rule
    nat = _logits_in_subprocess(real_fastgen_gguf, ids, 8, {}, tmp_path)
    ref, full = _reference(model_dir, real_fastgen_gguf, ids, 8, 1024)
    _agrees(nat[start:], ref[start:], full[start:])


@pytest.mark.parametrize("n_batch,fused,flash_attn", [(1, "1", False), (1, "1", True), (64, "1", False), (64, "0", False)])
def test_inputs_as_views_of_one_graph_input_give_the_same_logits(n_batch, fused, flash_attn, real_fastgen_gguf, long_ids,
                                                                  tmp_path):
    """LLAMA_FASTGEN_INPUT_COPY=1: every fastgen input a typed view of one graph input's copy (llama-graph-fastgen.cpp,
    input_blob), written through the blob's host bytes. The same ops read the same values, so the logits equal those of
    an input each to the bit: decode steps (the fused op, full-class masks updated from the last step's; with flash
    attention F16 masks and one index view for K and V, as on a GPU), ubatches of 64 (the fused op's prefill) and the
    composed path (its keep and cell positions too), evictions included."""
    meta = schema.read(real_fastgen_gguf)
    ids = long_ids[: 1 + max(c.budget for c in meta.classes) + 160]
    env = {"LLAMA_FASTGEN_HH_FUSED": fused, "LLAMA_FASTGEN_DISABLE": "0"}
    apart = _logits_in_subprocess(real_fastgen_gguf, ids, n_batch, {**env, "LLAMA_FASTGEN_INPUT_COPY": "0"}, tmp_path,
                                  flash_attn)
    blob = _logits_in_subprocess(real_fastgen_gguf, ids, n_batch, {**env, "LLAMA_FASTGEN_INPUT_COPY": "1"}, tmp_path,
                                 flash_attn)
    assert apart.shape == (len(ids), blob.shape[1]) and np.isfinite(apart).all()
    assert np.array_equal(apart, blob)


_MASK_SCRIPT = """
import json, sys
import numpy as np
import llama_cpp
from llama_fastgen import native
from llama_cpp import Llama
ids = json.loads(sys.argv[3])
llm = Llama(model_path=sys.argv[2], n_ctx=1024, n_batch=64, verbose=False)
rows, removed = [], False
def step(toks):  # the logits of the last token
    llm.eval(toks)
    rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy())
step(ids[:300])                    # a prompt
for t in ids[300:360]:             # decode steps
    step([t])
removed = llm._ctx.kv_cache_seq_rm(0, llm.n_tokens - 3, -1)  # a tail removal between decode steps
llm.n_tokens -= 3 if removed else 0
for t in ids[357:380]:
    step([t])
step(ids[380:400])                 # another prompt chunk
for t in ids[400:430]:
    step([t])
np.save(sys.argv[1], np.stack(rows))
print(json.dumps({**native.cache_stats(llm)["masks"], "removed": bool(removed)}))
"""


def _masks_updated_and_filled(script, gguf, ids, tmp_path):
    """(logits, mask counts) of a mask script run as is and with LLAMA_FASTGEN_CHECK_MASK=1 (every update
    checked against llama.cpp's fill, which the tensor then holds)"""
    import json

    from llama_fastgen.evaluation.report import mask_timing

    runs = []
    for name, env in (("updated", {"LLAMA_FASTGEN_TIMING": "1"}), ("filled", {"LLAMA_FASTGEN_CHECK_MASK": "1"})):
        out = tmp_path / f"{name}.npy"
        base = {k: v for k, v in os.environ.items() if k not in ("LLAMA_FASTGEN_TIMING", "LLAMA_FASTGEN_CHECK_MASK")}
        r = subprocess.run([sys.executable, "-c", script, str(out), str(gguf), json.dumps(ids)],
                           capture_output=True, text=True, timeout=600, env={**base, **env})
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append((np.load(out), json.loads(r.stdout.strip().splitlines()[-1])))
        if name == "updated":  # the timing line at exit counts what the C API counts
            t = mask_timing(r.stderr)
            assert t and (t["filled"], t["updated"]) == (runs[-1][1]["filled"], runs[-1][1]["updated"]), (t, runs[-1][1])
    return runs


def test_decode_masks_updated_from_the_last_step_equal_llamas_fill(static_fastgen_gguf, long_ids, tmp_path):
    """A decode step's full-class mask starts from the last step's (only the new token's cell changes) unless
    the cells changed otherwise. Oracle: the same run with LLAMA_FASTGEN_CHECK_MASK=1, which fills every mask
    with llama.cpp's pass over every cell and compares: the logits are the same to the bit, no update
    differed, and updates did run (a tail removal and a prompt chunk between decode steps fill again)."""
    (upd, cu), (ful, cf) = _masks_updated_and_filled(_MASK_SCRIPT, static_fastgen_gguf, long_ids[:430], tmp_path)
    assert cu["removed"] and cf["removed"]
    # 113 decode steps: a fill after the prompt, the removal and the chunk (and where n_kv grows), else updates
    assert cu["updated"] >= 100 and 3 <= cu["filled"] <= 10, cu
    assert cf == cu and cf["mismatched"] == 0, (cf, cu)  # the same decisions; every update checked against the fill
    assert np.array_equal(upd, ful)


_MASK_STREAMS_SCRIPT = """
import json, sys
import numpy as np
import llama_fastgen
from llama_fastgen import native
import llama_cpp as lc
ids = json.loads(sys.argv[3])
model = lc.llama_model_load_from_file(sys.argv[2].encode(), lc.llama_model_default_params())
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 1024, 256, 64, 2, False  # a stream per sequence
cp.n_threads = cp.n_threads_batch = 2
ctx = lc.llama_init_from_model(model, cp)
batch = lc.llama_batch_init(256, 0, 1)
rows = []
def decode(items):
    batch.n_tokens = len(items)
    for i, (tok, pos, seq) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, i == len(items) - 1
        batch.seq_id[i][0] = seq
    assert lc.llama_decode(ctx, batch) == 0
    rows.append(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)),)).copy())
decode([(t, p, 0) for p, t in enumerate(ids[:200])])      # sequence 0 in stream 0
decode([(t, p, 1) for p, t in enumerate(ids[200:400])])   # sequence 1 in stream 1
for p, t in enumerate(ids[400:460]):                      # decode steps of sequence 1: stream 1's cells
    decode([(t, 200 + p, 1)])
np.save(sys.argv[1], np.stack(rows))
counts = native.mask_counts(ctx)
lc.llama_batch_free(batch)
lc.llama_free(ctx)
lc.llama_model_free(model)
print(json.dumps(counts))
"""


def test_decode_masks_are_updated_in_every_stream_of_a_per_sequence_cache(static_fastgen_gguf, long_ids, tmp_path):
    """With a stream per sequence (kv_unified off), sequence 1's cell indices carry its stream's offset; its
    decode steps update their masks all the same. Oracle: the LLAMA_FASTGEN_CHECK_MASK=1 run (llama.cpp's fill
    compared with every update): the same logits to the bit, no update differed."""
    (upd, cu), (ful, cf) = _masks_updated_and_filled(_MASK_STREAMS_SCRIPT, static_fastgen_gguf, long_ids[:460], tmp_path)
    assert cu["updated"] >= 55, cu  # 60 steps: the first fills (and where n_kv grows)
    assert cf == cu and cf["mismatched"] == 0, (cf, cu)
    assert np.array_equal(upd, ful)


def test_ubatch_size_does_not_change_static_keep_sets(static_fastgen_gguf, long_ids):
    """Strict semantics: a static policy applies inside a ubatch too, so token-by-token decoding and
    batches of 128 see the same keys; what remains is the numeric noise stock llama.cpp shows too.
    (Frequent heads evict between ubatches, so for them the ubatch size is part of the rule.)"""
    real_fastgen_gguf = static_fastgen_gguf
    ids = long_ids[:700]
    p99 = {}
    assert [c for c in schema.read(real_fastgen_gguf).classes if c.kind != Kind.FULL]   # the static rules run
    for name, kw in (("fastgen", {}), ("stock", {"kv_overrides": {"fastgen.enable": False}})):
        one = llama_logits(real_fastgen_gguf, ids, n_ctx=1024, n_batch=1, flash_attn=True, **kw)
        big = llama_logits(real_fastgen_gguf, ids, n_ctx=1024, n_batch=128, flash_attn=True, **kw)
        assert (one.argmax(-1) == big.argmax(-1)).mean() >= 0.99
        p99[name] = np.quantile(np.abs(one - big).max(-1), 0.99)
    assert p99["fastgen"] <= 2 * p99["stock"] + 0.02, p99


@pytest.mark.parametrize("n_ctx", [2048, 8192])
def test_allocated_kv_bytes_equal_the_policy_formula(real_fastgen_gguf, n_ctx):
    meta = schema.read(real_fastgen_gguf)
    llm = Llama(model_path=str(real_fastgen_gguf), n_ctx=n_ctx, n_ubatch=512, verbose=False)
    try:
        st = llama_fastgen.native.cache_stats(llm)
    finally:
        llm.close()
    want = schema.kv_bytes(meta, head_dim=64, n_ctx=n_ctx, n_ubatch=512)
    got = {c["class"]: c["bytes"] for c in st["classes"]}
    assert got == {cls.label: b for cls, b in zip(meta.at_context(n_ctx).classes, want) if b}
    assert st["kv_bytes"] == sum(want)
    assert st["full_bytes"] == _f16_kv_bytes_per_cell(real_fastgen_gguf) * n_ctx
    assert st["kv_bytes"] < st["full_bytes"]


def _f16_kv_bytes_per_cell(gguf_path) -> int:
    """An ordinary f16 cache's K+V bytes per cell: layers x KV heads x (key + value length) x 2 bytes, from the
    model's own keys (SmolLM2-135M: 30 x 3 x (64 + 64) x 2)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    n_head = schema.arch_int(r, "attention.head_count")
    head = schema.arch_int(r, "attention.key_length", default=schema.arch_int(r, "embedding_length") // n_head)
    return (schema.arch_int(r, "block_count") * schema.arch_int(r, "attention.head_count_kv") *
            (head + schema.arch_int(r, "attention.value_length", default=head)) * 2)


def test_fastgen_can_be_switched_off_for_ab_comparison(real_fastgen_gguf):
    llm = Llama(model_path=str(real_fastgen_gguf), n_ctx=2048, verbose=False, kv_overrides={"fastgen.enable": False})
    try:
        st = llama_fastgen.native.cache_stats(llm)
    finally:
        llm.close()
    assert not st["fastgen"] and st["kv_bytes"] == st["full_bytes"] == _f16_kv_bytes_per_cell(real_fastgen_gguf) * 2048


def test_chat_streams_and_a_second_turn_reuses_or_resets_correctly(real_fastgen_gguf):
    q1 = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    llm = Llama(model_path=str(real_fastgen_gguf), n_ctx=2048, verbose=False)
    chunks = [c["choices"][0]["delta"].get("content") or "" for c in
              llm.create_chat_completion(messages=q1, max_tokens=24, temperature=0.0, stream=True)]
    first = "".join(chunks)
    assert sum(1 for c in chunks if c) > 3 and "Paris" in first
    # second turn: llama-cpp-python tries to keep the common prefix (seq_rm inside the history),
    # the compressed cache refuses and, the first prompt being shorter than one chunk (no checkpoint,
    # llama_fastgen.checkpoints), the cache is reset and the prompt re-evaluated
    q2 = q1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    second = llm.create_chat_completion(messages=q2, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    llm.close()
    fresh = Llama(model_path=str(real_fastgen_gguf), n_ctx=2048, verbose=False)
    again = fresh.create_chat_completion(messages=q2, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
    fresh.close()
    assert second == again and second


BAD = {
    "unknown class id": ({"fastgen.class.kind": ("i32[]", [7])}, "fastgen.class.kind[0] = 7"),
    "wrong length": ({"fastgen.layer_class_heads": ("i32[]", [2, 2])}, "fastgen.layer_class_heads has 2 entries"),
    "old version": ({"fastgen.version": ("u32", 0)}, "fastgen.version is 0"),
    "head count mismatch": ({"fastgen.layer_class_heads": ("i32[]", [3] * 4)}, "the model has 2"),
    "zero budget": ({"fastgen.class.kind": ("i32[]", [4]), "fastgen.class.window": ("i32[]", [16]),
                     "fastgen.class.budget": ("i32[]", [0])}, "fastgen.class.budget[0] = 0 must exceed"),
    "budget of a full class": ({"fastgen.class.budget": ("i32[]", [64])}, "only frequent classes have a budget"),
    "frequent classes apart": ({"fastgen.class.kind": ("i32[]", [4, 0, 4]), "fastgen.class.window": ("i32[]", [8, 0, 8]),
                                "fastgen.class.budget": ("i32[]", [64, 0, 32]),
                                "fastgen.layer_class_heads": ("i32[]", [1, 1, 0] * 4)}, "must be consecutive"),
}
# crafted files that once got past the checks (an int32 head-count sum that wraps back to 2) or
# carry absurd sizes; the Python reader must refuse them too
HOSTILE = {
    "wrapping head counts": ({"fastgen.class.kind": ("i32[]", [0, 1, 2]), "fastgen.class.window": ("i32[]", [0, 1, 1]),
                              "fastgen.layer_class_heads": ("i32[]", [2**31 - 1, 2**31 - 1, 4] * 4)},
                             "layer 0 class 0 2147483647 KV heads"),
    "huge n_sink": ({"fastgen.n_sink": ("u32", 4_000_000_000)}, "fastgen.n_sink = 4000000000 exceeds"),
    "too many classes": ({"fastgen.class.kind": ("i32[]", [1] * 65), "fastgen.class.window": ("i32[]", [1] * 65)},
                         "65 classes, at most 64"),
    "huge window": ({"fastgen.class.kind": ("i32[]", [3]), "fastgen.class.window": ("i32[]", [1 << 30])},
                    "fastgen.class.window[0] = 1073741824 is invalid"),
    "zero budget_ctx": ({"fastgen.budget_ctx": ("u32", 0)}, "fastgen.budget_ctx = 0 must be in"),
    "huge budget_ctx": ({"fastgen.budget_ctx": ("u32", 2**32 - 1)}, "fastgen.budget_ctx = 4294967295 must be in"),
}
BAD.update(HOSTILE)
TINY_BASE = {"fastgen.version": ("u32", 1), "fastgen.threshold": ("f32", 0.9), "fastgen.n_sink": ("u32", 4),
             "fastgen.protected_frac": ("f32", 0.1), "fastgen.class.kind": ("i32[]", [0]),
             "fastgen.class.window": ("i32[]", [0]), "fastgen.layer_class_heads": ("i32[]", [2] * 4),
             "fastgen.head_perm": ("i32[]", [0, 1] * 4)}


def _tiny_frequent(tiny_model_dir, path, budget, window=8):
    """The tiny model with every KV head in one frequent class."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [4]), "fastgen.class.window": ("i32[]", [window]),
          "fastgen.class.budget": ("i32[]", [budget])}
    return gguf_export.convert(tiny_model_dir, path, "f32", extra_kv=kv)


def test_timing_counts_the_ubatches_and_the_host_time_after_the_wait(tiny_model_dir, tmp_path):
    """LLAMA_FASTGEN_TIMING=1's ubatch line: every applied ubatch counted (300 tokens in ubatches of 64: 5), the
    evicting ones among those that waited for the device, and the host time from there to the end of the
    fastgen input's set_input (what the device idles for besides the stores' own phases)."""
    from llama_fastgen.evaluation.report import ubatch_timing

    g = _tiny_frequent(tiny_model_dir, tmp_path / "hh.gguf", budget=64)
    code = ("import llama_fastgen, sys\nfrom llama_cpp import Llama\n"
            "llm = Llama(model_path=sys.argv[1], n_ctx=512, n_batch=64, verbose=False)\nllm.eval(list(range(1, 301)))\n")
    r = subprocess.run([sys.executable, "-c", code, str(g)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LLAMA_FASTGEN_TIMING="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    t = ubatch_timing(r.stderr)
    assert t and t["applied"] == 5, r.stderr[-2000:]
    assert 1 <= t["evicting"] <= t["waited"] <= t["applied"] and t["after_wait_ms"] > 0, t


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_is_refused_with_the_key_named(case, tiny_model_dir, tmp_path):
    base = TINY_BASE
    patch, expect = BAD[case]
    out = gguf_export.convert(tiny_model_dir, tmp_path / "bad.gguf", "f32", extra_kv={**base, **patch}, check=False)
    with pytest.raises(ValueError) as e:
        Llama(model_path=str(out), n_ctx=256, verbose=False)
    assert expect in str(e.value)
    # the process is fine and the same file loads with a valid policy table afterwards
    good = gguf_export.convert(tiny_model_dir, tmp_path / "good.gguf", "f32", extra_kv=base)
    Llama(model_path=str(good), n_ctx=256, verbose=False).close()


def test_state_save_and_load_resumes_exactly(real_fastgen_gguf, long_ids):
    """A saved state (slices, retained sinks and protected token ids) resumes with the same keys.
    Restored cells sit at other indices, so attention sums in another order: equal up to
    float noise (measured max |diff| ~1e-3), while a lost retained token moves logits by ~1."""
    llm = Llama(model_path=str(real_fastgen_gguf), n_ctx=2048, n_batch=64, logits_all=True, verbose=False)
    try:
        llm.eval(long_ids[:900])                    # past the windows: evictions and retention happened
        state = llm.save_state()
        llm.eval(long_ids[900:1100])
        first = np.array(llm.scores[900:1100])
        llm.load_state(state)
        assert llm.n_tokens == 900
        llm.eval(long_ids[900:1100])
        again = np.array(llm.scores[900:1100])
    finally:
        llm.close()
    assert (first.argmax(-1) == again.argmax(-1)).all()
    assert np.abs(first - again).max() < 0.02, np.abs(first - again).max()


def _with_state(state, raw: bytes):
    from llama_cpp.llama import LlamaState

    return LlamaState(state.input_ids, state.scores, state.n_tokens, raw, len(raw), state.seed)


def _hh_offsets(raw: bytes, n_class: int) -> dict:
    """Byte offsets in a saved state of our header and the heavy-hitter store's first head:
    magic, fingerprint u64, per class (u32 count, count x (seq, pos)), the number of stores (u32), then
    the first store's cap, n_layer, last_pos, and per head n_used, pos[cap], tok[cap]
    (llama-kv-cache-fastgen{,-hh}.cpp state_write)."""
    import struct

    at = raw.find(struct.pack("<I", 0x32534746))
    assert at >= 0 and raw.find(struct.pack("<I", 0x32534746), at + 1) < 0
    off = at + 12
    for _ in range(n_class):
        off += 4 + 8 * struct.unpack_from("<I", raw, off)[0]
    assert struct.unpack_from("<I", raw, off)[0] == 1  # one sequence: one store
    off += 4
    cap = struct.unpack_from("<I", raw, off)[0]
    head = off + 12
    pos = np.frombuffer(raw, dtype="<i4", count=cap, offset=head + 4)
    return {"fingerprint": at + 4, "n_used": head, "tok": head + 4 + 4 * cap + 4 * int(np.argmax(pos >= 0)),
            "cap": cap}


def test_a_corrupt_truncated_or_foreign_state_is_refused_and_the_context_stays_usable(real_fastgen_gguf, long_ids):
    """Every count, position and token id a saved state holds is checked before use; a refused
    restore names why and leaves the cache empty and working (what fresh evaluation gives)."""
    import re
    import struct

    meta = schema.read(real_fastgen_gguf)
    kw = dict(model_path=str(real_fastgen_gguf), n_ctx=2048, n_batch=64, logits_all=True, verbose=False)
    llm = Llama(**kw)
    try:
        llm.eval(long_ids[:300])
        fresh = np.array(llm.scores[:300])
        llm.reset()
        llm.eval(long_ids[:900])
        good = llm.save_state()
        raw = bytes(good.llama_state)
        o = _hh_offsets(raw, len(meta.classes))

        def patched(at, fmt, value):
            b = bytearray(raw)
            struct.pack_into(fmt, b, at, value)
            return bytes(b)

        bad = {"truncated": (raw[: (o["fingerprint"] + len(raw)) // 2], "end of buffer|failed to restore kv cache"),
               "another policy": (patched(o["fingerprint"], "<Q", 12345), "another policy table or context size"),
               "cell count": (patched(o["n_used"], "<I", o["cap"] + 1), "cells said used"),
               "token id": (patched(o["tok"], "<i", 1 << 30), "corrupt heavy-hitter state")}
        for name, (b, why) in bad.items():
            with pytest.raises(RuntimeError, match="Failed to set llama state data") as e:
                llm.load_state(_with_state(good, b))
            assert re.search(why, str(e.value)), (name, str(e.value))
            st = llama_fastgen.native.cache_stats(llm)
            assert all(c["used"] == 0 for c in st["classes"]), (name, st)
            llm.reset()
            llm.eval(long_ids[:300])
            assert np.abs(np.array(llm.scores[:300]) - fresh).max() < 1e-4, name
        llm.load_state(good)      # and the good state still restores
        assert llm.n_tokens == 900
    finally:
        llm.close()
    other = Llama(**{**kw, "n_ctx": 4096})
    try:
        with pytest.raises(RuntimeError, match="another policy table or context size"):
            other.load_state(good)
        other.reset()
        other.eval(long_ids[:300])
        assert np.abs(np.array(other.scores[:300]) - fresh).max() < 1e-4
    finally:
        other.close()


def test_a_full_protected_budget_drops_the_oldest_protected_tokens(static_fastgen_gguf):
    """Text that is nothing but punctuation outgrows every compressed class's protected budget
    (sized from the calibration share): decoding goes on, the oldest protected tokens go."""
    llm = Llama(model_path=str(static_fastgen_gguf), n_ctx=2048, n_batch=64, verbose=False)
    try:
        ids = llm.tokenize(b"!?.,;:" * 1000, add_bos=False)[:1800]
        small = [c for c in llama_fastgen.native.cache_stats(llm)["classes"] if c["class"] != "full"]
        assert small and max(c["cells"] for c in small) < len(ids)
        llm.eval(ids)
        st = llama_fastgen.native.cache_stats(llm)
        assert llm.n_tokens == len(ids)
        for c in st["classes"]:
            assert c["used"] <= c["cells"]
        # every class that protects punctuation dropped its oldest protected tokens, and kept the newest
        assert _dropped(llm) and all(0 < d < len(ids) for d in _dropped(llm).values()), _dropped(llm)
        # the last token's logits, read from the context (without logits_all, llama-cpp-python's
        # scores array only holds some rows; the others are uninitialized memory)
        import llama_cpp

        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        assert np.isfinite(last).all() and np.abs(last).max() > 0
    finally:
        llm.close()


def test_dropped_protected_tokens_match_the_reference_of_the_same_drops(static_fastgen_gguf, model_dir, long_ids):
    """Prose interleaved with runs of punctuation outgrows the protected budget of the special+punct
    classes: native logits equal the PyTorch reference that replays the same drops (slice sizes read
    from the native context), and not the reference that keeps every protected token."""
    meta = schema.read(static_fastgen_gguf)
    punct = sorted(meta.punct_token_ids)
    ids, i = [], 0
    while len(ids) < 900:
        ids += long_ids[i * 24:(i + 1) * 24] + [punct[(i * 7 + j) % len(punct)] for j in range(40)]
        i += 1
    nat, st = teacher_forced(static_fastgen_gguf, ids, n_ctx=1024, n_batch=64)
    cells = {c["class"]: c["cells"] for c in st["classes"]}
    replays = []
    ref, full = _reference(model_dir, static_fastgen_gguf, ids, 64, 1024, replay=lambda pol, ctx: replays.append(
        reference.Replay(pol, ctx, cells)) or replays[-1])
    drops = {b.label: b.drops for b in replays[0].budgets.values()}
    assert sum(map(bool, drops.values())) >= 2 and max(map(len, drops.values())) >= 2, drops
    # the same drops: where each class stopped dropping, natively and in the replay
    assert {c["class"]: c["dropped_upto"] for c in st["classes"] if c["class"] in drops} == \
        {label: d[-1][2] if d else 0 for label, d in drops.items()}
    kept, _ = _reference(model_dir, static_fastgen_gguf, ids, 64, 1024)      # protected tokens never dropped
    start = min(p0 for d in drops.values() for p0, _, _ in d)
    _agrees(nat[start:], ref[start:], full[start:])
    err = lambda a: np.quantile(np.abs(nat[start:] - a[start:]).max(-1), 0.99)
    assert err(kept) > 3 * err(ref), (err(kept), err(ref))   # measured: 0.076 vs 0.017


def _dropped(llm) -> dict:
    """Where each class that protects punctuation has dropped protected tokens up to."""
    return {c["class"]: c["dropped_upto"] for c in llama_fastgen.native.cache_stats(llm)["classes"] if "punct" in c["class"]}


def test_a_restored_state_drops_protected_tokens_as_the_run_that_saved_it(static_fastgen_gguf):
    """Where each class has dropped protected tokens is part of the saved state: restoring a state
    saved before any drop and going on gives what the first run gave (no stale drop boundary)."""
    llm = Llama(model_path=str(static_fastgen_gguf), n_ctx=2048, n_batch=64, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(b"!?.,;:" * 1000, add_bos=False)[:1800]
        llm.eval(ids[:128])
        early = llm.save_state()
        before = _dropped(llm)
        llm.eval(ids[128:])                     # the protected budgets overflow: drops happen here
        first, dropped = np.array(llm.scores[128:1800]), _dropped(llm)
        llm.load_state(early)
        restored = _dropped(llm)
        llm.eval(ids[128:])
        again = np.array(llm.scores[128:1800])
        assert _dropped(llm) == dropped
    finally:
        llm.close()
    assert not any(before.values()) and all(dropped.values()) and restored == before, (before, dropped, restored)
    assert (first.argmax(-1) == again.argmax(-1)).all()
    assert np.abs(first - again).max() < 0.02, np.abs(first - again).max()


def test_a_frequent_budget_beyond_the_context_never_evicts_and_equals_the_full_cache(tiny_model_dir, tmp_path, long_ids):
    """Every head in the heavy-hitter store (explicit softmax, per-head cells) with nothing to evict:
    the same attention as the ordinary cache, up to f16/f32 rounding."""
    g = _tiny_frequent(tiny_model_dir, tmp_path / "hh.gguf", budget=4096)
    ids = long_ids[:400]
    on, st = teacher_forced(g, ids, n_ctx=512, n_batch=64)
    off = llama_logits(g, ids, n_ctx=512, flash_attn=True, kv_overrides={"fastgen.enable": False})
    assert st["fastgen"] and st["classes"][0]["cells"] == 512 and st["classes"][0]["used"] == 400
    assert (on.argmax(-1) == off.argmax(-1)).mean() >= 0.99 and np.abs(on - off).max() < 0.05


def test_a_small_frequent_budget_evicts_and_stays_finite(tiny_model_dir, tmp_path, long_ids):
    g = _tiny_frequent(tiny_model_dir, tmp_path / "hh.gguf", budget=48)
    on, st = teacher_forced(g, long_ids[:300], n_ctx=512, n_batch=16)
    cells = 48 + max(16, schema.FREQUENT_EVICT_BATCH)   # the budget and room for a ubatch or an eviction batch
    assert st["classes"][0]["used"] == _used_after(300, 16, 48) < 300 and st["classes"][0]["cells"] == cells
    # layers x heads x (cells x (K+V f16 + score + position) + padding with the CUDA kernel's block counter)
    assert st["kv_bytes"] == 4 * 2 * (cells * (8 * 2 * 2 + 4 + 4) + schema.HH_POS_PAD * 4)
    assert np.isfinite(on).all()


def test_budgets_grow_with_the_context_natively_as_in_python_and_the_reference(tiny_model_dir, tmp_path, long_ids):
    """fastgen.budget_ctx: above it, windows and heavy-hitter budgets grow by n_ctx / budget_ctx. The
    labels, cells and bytes a native context reports equal Python's rule (schema.at_context), and the
    logits equal the PyTorch reference of the grown keep-sets, not of the stored ones."""
    import torch
    from transformers import AutoModelForCausalLM

    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [3, 4]), "fastgen.class.window": ("i32[]", [16, 8]),
          "fastgen.class.budget": ("i32[]", [0, 40]), "fastgen.layer_class_heads": ("i32[]", [1, 1] * 4),
          "fastgen.budget_ctx": ("u32", 128)}
    g = gguf_export.convert(tiny_model_dir, tmp_path / "scaled.gguf", "f32", extra_kv=kv)
    meta = schema.read(g)
    assert meta.budget_ctx == 128
    for asked in (128, 256, 1000):
        llm = Llama(model_path=str(g), n_ctx=asked, n_ubatch=64, verbose=False)
        try:
            st, n_ctx = llama_fastgen.native.cache_stats(llm), llm.n_ctx()  # llama.cpp pads n_ctx to 256
        finally:
            llm.close()
        want = meta.at_context(n_ctx)
        assert [c["class"] for c in st["classes"]] == [c.label for c in want.classes]
        assert st["kv_bytes"] == sum(schema.kv_bytes(meta, head_dim=8, n_ctx=n_ctx, n_ubatch=64))
    assert [c.label for c in meta.at_context(128).classes] == ["special+punct+local16", "special+frequent40+local8"]
    assert [c.label for c in meta.at_context(512).classes] == ["special+punct+local64", "special+frequent160+local32"]

    ids = long_ids[:480]
    nat, st = teacher_forced(g, ids, n_ctx=512, n_batch=64)
    assert st["classes"][1]["used"] == _used_after(len(ids), 64, 160)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ctx = token_context(ids, set(), set(), meta.n_sink)
    grown = reference.logits(m, ids, meta.at_context(512).original_head_policies(), ctx, chunks=64).numpy()
    stored = reference.logits(m, ids, meta.original_head_policies(), ctx, chunks=64).numpy()
    err = lambda a: np.quantile(np.abs(nat[230:] - a[230:]).max(-1), 0.99)
    assert (nat.argmax(-1) == grown.argmax(-1)).mean() >= 0.99 and err(grown) < 0.01, err(grown)
    assert err(stored) > 5 * err(grown), (err(stored), err(grown))


def test_frequent_heads_refuse_several_sequences_with_a_clear_error(tiny_model_dir, tmp_path):
    g = _tiny_frequent(tiny_model_dir, tmp_path / "hh.gguf", budget=64)
    with pytest.raises(ValueError, match="n_seq_max = 1"):
        Llama(model_path=str(g), n_ctx=512, embedding=True, verbose=False)  # embedding: n_seq_max > 1
    Llama(model_path=str(g), n_ctx=512, verbose=False).close()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_python_reader_refuses_what_the_native_loader_refuses(case, tiny_model_dir, tmp_path):
    from llama_fastgen import schema

    out = gguf_export.convert(tiny_model_dir, tmp_path / "bad.gguf", "f32", extra_kv={**TINY_BASE, **HOSTILE[case][0]},
                              check=False)
    with pytest.raises(schema.MetadataError):
        schema.read(out)


@pytest.mark.parametrize("value,enabled", [(False, False), (True, True), (0, False), (1, True), ("false", False),
                                           ("true", True), ("0", False), (2, None), ("maybe", None), (0.5, None)])
def test_fastgen_enable_override_takes_bool_int_or_string_and_refuses_the_rest(value, enabled, tiny_model_dir, tmp_path):
    g = gguf_export.convert(tiny_model_dir, tmp_path / "t.gguf", "f32", extra_kv=TINY_BASE)
    if enabled is None:
        with pytest.raises(ValueError, match="fastgen.enable must be true/false"):
            Llama(model_path=str(g), n_ctx=256, verbose=False, kv_overrides={"fastgen.enable": value})
        return
    llm = Llama(model_path=str(g), n_ctx=256, verbose=False, kv_overrides={"fastgen.enable": value})
    assert llama_fastgen.native.cache_stats(llm)["fastgen"] is enabled
    llm.close()


def test_other_fastgen_overrides_are_refused_by_name(tiny_model_dir, tmp_path):
    g = gguf_export.convert(tiny_model_dir, tmp_path / "t.gguf", "f32", extra_kv=TINY_BASE)
    with pytest.raises(ValueError, match="kv_overrides fastgen.n_sink is not supported"):
        Llama(model_path=str(g), n_ctx=256, verbose=False, kv_overrides={"fastgen.n_sink": 8})
    Llama(model_path=str(g), n_ctx=256, verbose=False).close()    # the process is fine afterwards


def test_fastgen_overrides_on_a_gguf_without_a_policy_are_refused(tiny_model_dir, tmp_path):
    """Asking for the fastgen cache of a plain GGUF must not silently run the full cache."""
    g = gguf_export.convert(tiny_model_dir, tmp_path / "plain.gguf", "f32")
    for key, value in (("fastgen.enable", True), ("fastgen.undo_tokens", 8)):
        with pytest.raises(ValueError, match=f"kv_overrides {key}, but this GGUF has no fastgen policy"):
            Llama(model_path=str(g), n_ctx=256, verbose=False, kv_overrides={key: value})
    llm = Llama(model_path=str(g), n_ctx=256, verbose=False, kv_overrides={"fastgen.enable": False})  # asks for what it gets
    assert llama_fastgen.native.cache_stats(llm)["fastgen"] is False
    llm.close()


@pytest.mark.parametrize("value,enabled", [("0", True), ("off", True), ("", True), ("1", False), ("yes", False),
                                           ("false ", None), ("disable", None)])
def test_llama_fastgen_disable_takes_yes_or_no_and_refuses_the_rest(value, enabled, tiny_model_dir, tmp_path, monkeypatch):
    g = gguf_export.convert(tiny_model_dir, tmp_path / "t.gguf", "f32", extra_kv=TINY_BASE)
    monkeypatch.setenv("LLAMA_FASTGEN_DISABLE", value)
    if enabled is None:
        with pytest.raises(ValueError, match=f"LLAMA_FASTGEN_DISABLE={value}: expected 1"):
            Llama(model_path=str(g), n_ctx=256, verbose=False)
        return
    llm = Llama(model_path=str(g), n_ctx=256, verbose=False)
    assert llama_fastgen.native.cache_stats(llm)["fastgen"] is enabled
    llm.close()


def test_chat_says_when_a_context_is_too_small_for_the_policy_to_save_memory(tiny_model_dir, tmp_path):
    """Every head a 16-token window: at n_ctx 256 its cells (padded for a ubatch of 512) are the context's."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [int(Kind.SPECIAL_PUNCT_LOCAL)]), "fastgen.class.window": ("i32[]", [16])}
    g = gguf_export.convert(tiny_model_dir, tmp_path / "t.gguf", "f32", extra_kv=kv)
    said = {}
    for n_ctx in (256, 4096):
        r = subprocess.run([sys.executable, "-m", "llama_fastgen", "chat", str(g), "--n-ctx", str(n_ctx), "--prompt", "hi",
                            "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        saved = int(re.search(r"\((-?\d+)% saved\)", r.stdout).group(1))
        said[n_ctx] = (saved, "saves memory only at a larger --n-ctx" in r.stdout)
    assert said[256][0] <= 0 and said[256][1] and said[4096][0] > 0 and not said[4096][1], said


@pytest.mark.parametrize("name", ["LLAMA_FASTGEN_HH_FUSED", "LLAMA_FASTGEN_TIMING", "LLAMA_FASTGEN_CHECK_MASK",
                                  "LLAMA_FASTGEN_INPUT_COPY"])
def test_every_switch_refuses_a_value_it_does_not_know_at_load(name, tiny_model_dir, tmp_path):
    """The switches read mid-run (once per process; LLAMA_FASTGEN_INPUT_COPY per context) are checked at load, with
    LLAMA_FASTGEN_DISABLE's words: a fresh process, since a switch read once keeps its first value."""
    g = gguf_export.convert(tiny_model_dir, tmp_path / "t.gguf", "f32", extra_kv=TINY_BASE)
    code = ("import llama_fastgen, sys\nfrom llama_cpp import Llama\n"
            "try:\n    Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)\nexcept ValueError as e:\n    print(e)\n")
    for value, refused in (("false", False), ("On", False), ("maybe", True)):  # the words in any case
        r = subprocess.run([sys.executable, "-c", code, str(g)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, **{name: value}))
        assert r.returncode == 0, r.stderr[-2000:]
        assert (f"{name}={value}: expected 1/true/yes/on or 0/false/no/off" in r.stdout) is refused, r.stdout


def test_shifting_a_compressed_cache_raises_and_leaves_its_positions(tiny_model_dir, tmp_path):
    """llama.cpp's seq_add returns nothing: the refusal reaches Python as a ValueError, not a hidden log line."""
    import llama_cpp

    g = _tiny_frequent(tiny_model_dir, tmp_path / "hh.gguf", budget=64)
    llm = Llama(model_path=str(g), n_ctx=512, verbose=False)
    llm.eval(list(range(1, 121)))
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    with pytest.raises(ValueError, match="cannot be shifted"):
        llm._ctx.kv_cache_seq_shift(0, 10, -1, -5)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 119
    llm._ctx.kv_cache_seq_shift(0, 10, -1, 0)    # no shift: nothing to refuse
    llm.eval([5])                                # and the context goes on
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 120
    llm.close()
