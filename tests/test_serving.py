"""Serving a fastgen GGUF through llama-cpp-python's OpenAI-compatible server (`llama-fastgen serve`,
i.e. `python -m llama_cpp.server` on our libllama). The oracle is the same requests made in process
through `Llama.create_chat_completion`: greedy answers must be equal, streamed or not, one at a time
or concurrent, and the server's cache must be the fastgen one."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llama_fastgen import schema
from llama_fastgen.converter import gguf_export
from llama_cpp import Llama
from helpers import ServerProcess, free_port
from test_native import TINY_BASE

GREEDY = {"max_tokens": 16, "temperature": 0.0, "repeat_penalty": 1.0, "seed": 7}
# ~300 tokens: past the heavy-hitter budget (40) and the windows, so both classes evict
TURN1 = [{"role": "user", "content": "Here is a list: " + ", ".join(f"item {i} is {i * 7 % 11}" for i in range(40))
          + ". Which item is 5?"}]


@pytest.fixture(scope="module")
def mixed_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model with a windowed and a heavy-hitter class in every layer."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [3, 4]), "fastgen.class.window": ("i32[]", [16, 8]),
          "fastgen.class.budget": ("i32[]", [0, 40]), "fastgen.layer_class_heads": ("i32[]", [1, 1] * 4)}
    return gguf_export.convert(tiny_model_dir, tmp_path_factory.mktemp("serve") / "mixed.gguf", "f32", extra_kv=kv)


class Server(ServerProcess):
    ready_path = "/v1/models"

    def __init__(self, gguf, tmp_path, *args):
        self.port = free_port()
        cmd = [sys.executable, "-m", "llama_fastgen", "serve", str(gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", "1024", "--n_ubatch", "64", *args]
        self.start(cmd, tmp_path / f"server-{self.port}.log")

    def post(self, messages, stream=False) -> str:
        body = json.dumps({"messages": messages, "stream": stream, **GREEDY}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            if not stream:
                return json.loads(r.read())["choices"][0]["message"]["content"]
            text = ""
            for line in r:  # server-sent events: "data: {...}" lines, then "data: [DONE]"
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            return text



def _in_process(gguf, conversations):
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_ubatch=64, verbose=False)
    try:
        return [llm.create_chat_completion(messages=m, **GREEDY)["choices"][0]["message"]["content"]
                for m in conversations]
    finally:
        llm.close()


def test_the_server_answers_as_llama_does_in_process_with_the_fastgen_cache(mixed_gguf, tmp_path):
    srv = Server(mixed_gguf, tmp_path)
    try:
        assert srv.wait_ready(), srv.stop()
        a1 = srv.post(TURN1)
        turn2 = TURN1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And two more?"}]
        a2 = srv.post(turn2)                       # the second turn shares the first as a prefix
        streamed = srv.post(TURN1, stream=True)
        with ThreadPoolExecutor(2) as ex:          # concurrent requests (the server serialises them)
            concurrent = list(ex.map(srv.post, [TURN1, turn2]))
    finally:
        log = srv.stop()
    assert a1 and a2
    assert [a1, a2] == _in_process(mixed_gguf, [TURN1, turn2])
    assert streamed == a1 and concurrent == [a1, a2]
    # the server ran the per-class cache (its log line), not an ordinary one
    cells = re.search(r"special\+frequent40\+local8 +4 heads, +(\d+) cells", log)
    assert "instead of" in log and cells, log[-3000:]
    assert int(cells.group(1)) == schema.class_capacity(schema.read(mixed_gguf), 1, 1024, 64)


def test_the_server_refuses_embedding_mode_of_heavy_hitter_heads_with_the_reason(mixed_gguf, tmp_path):
    """embedding mode asks llama.cpp for several sequences; heavy-hitter heads keep one."""
    srv = Server(mixed_gguf, tmp_path, "--embedding", "true")
    ready = srv.wait_ready()
    log = srv.stop()
    assert not ready and srv.proc.returncode != 0
    assert "n_seq_max = 1" in log and "Traceback" not in log, log[-3000:]


def test_serve_says_what_is_wrong_with_a_missing_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama_fastgen", "serve", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


# ------------------------------------------------------------------ prompt reuse (checkpoints.py)
REUSE = {"n_ctx": 512, "n_batch": 64, "n_ubatch": 64, "verbose": False}


@pytest.fixture(scope="module")
def three_class_gguf(tiny_model_dir, tmp_path_factory):
    """Full, windowed and heavy-hitter heads: checkpoints hold the last two only."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [0, 3, 4]), "fastgen.class.window": ("i32[]", [0, 16, 8]),
          "fastgen.class.budget": ("i32[]", [0, 0, 40]),
          "fastgen.layer_class_heads": ("i32[]", [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1])}
    return gguf_export.convert(tiny_model_dir, tmp_path_factory.mktemp("reuse") / "three.gguf", "f32", extra_kv=kv)


def test_a_new_question_about_the_same_document_restores_a_checkpoint_exactly(three_class_gguf, long_ids, monkeypatch):
    """Prompt A = document + question 1 (330 tokens: both classes have evicted), then an answer token by
    token; prompt B = document + question 2. The native cache refuses to drop A's tail; a checkpoint
    taken inside A is restored and the document's end evaluated again. Oracle: a cache that evaluated
    only B's shared prefix, then the rest of B (what "never having seen the old tail" means)."""
    from llama_fastgen import checkpoints

    doc, a, b = long_ids[:300], long_ids[:300] + long_ids[400:430], long_ids[:300] + long_ids[500:520]
    p0 = len(doc)
    llm = Llama(model_path=str(three_class_gguf), logits_all=True, **REUSE)
    llm.eval(a)
    for t in long_ids[600:608]:         # an answer, one token per call as generation does
        llm.eval([t])
    cps = checkpoints.of(llm)
    assert [c.pos for c in cps.items] == [256, 320]   # before A's last two chunks of 64
    # a checkpoint leaves the full heads out (a partial state): smaller than the whole sequence's state
    import llama_cpp
    assert len(cps.items[-1].state) < llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    assert llm._ctx.kv_cache_seq_rm(-1, p0, -1)
    assert cps.restored == 1 and llm.n_tokens == p0 and [c.pos for c in cps.items] == [256]
    llm.eval(b[p0:])
    got = llm.scores[p0 - 1:len(b)].copy()

    fresh = Llama(model_path=str(three_class_gguf), logits_all=True, **REUSE)
    fresh.eval(b[:p0])
    fresh.eval(b[p0:])
    want = fresh.scores[p0 - 1:len(b)]
    # restored cells sit in other slots, and CPU flash attention accumulates V in f16 in slot order:
    # equal up to that rounding (seen: 1.8e-4 of the largest logit)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())

    monkeypatch.setenv(checkpoints.ENV, "0")
    off = Llama(model_path=str(three_class_gguf), **REUSE)
    off.eval(a)
    assert checkpoints.of(off) is None and not off._ctx.kv_cache_seq_rm(-1, p0, -1)  # the native refusal


def test_a_second_completion_reuses_the_document_and_answers_as_a_fresh_cache(three_class_gguf, long_ids):
    """Through Llama.create_completion (llama-cpp-python's own prefix matching): the second prompt
    evaluates the end of the document and its question only, and answers as a cache that evaluated the
    document alone first."""
    from llama_fastgen import checkpoints

    doc, a, b = long_ids[:300], long_ids[:300] + long_ids[400:430], long_ids[:300] + long_ids[500:520]
    llm = Llama(model_path=str(three_class_gguf), **REUSE)
    evaluated = []
    orig = llm._ctx.decode
    llm._ctx.decode = lambda batch: (evaluated.append(batch.batch.n_tokens), orig(batch))[1]
    llm.create_completion(a, **GREEDY)
    evaluated.clear()
    # 8 tokens: the random tiny model has near-ties that f16 rounding (other cell slots) flips later on
    got = llm.create_completion(b, **{**GREEDY, "max_tokens": 8})["choices"][0]["text"]
    assert checkpoints.of(llm).restored == 1
    assert evaluated[:2] == [300 - 256, 20]   # the document's end again, then question 2; then the answer

    fresh = Llama(model_path=str(three_class_gguf), **REUSE)
    fresh.eval(doc)
    assert got == fresh.create_completion(b, **{**GREEDY, "max_tokens": 8})["choices"][0]["text"]


def test_speculative_decoding_rolls_back_rejected_drafts_and_decodes_as_without_drafts(three_class_gguf, long_ids):
    """Speculative decoding through llama-cpp-python (Llama(draft_model=...)): each step's drafts are the
    next two tokens of the answer, then a wrong one. Llama.generate removes the rejected draft from inside
    the compressed cache's history; a checkpoint taken before the drafts is restored and the accepted
    tokens evaluated again. Oracle: the greedy tokens without drafts, same GGUF. (llama-cpp-python 0.3.36
    sizes its logits for logits_all=False even when a draft model turns logits_all on, and fails past
    n_batch tokens with any cache: logits_all=True is the workaround.)"""
    import itertools

    from llama_cpp.llama_speculative import LlamaDraftModel
    from llama_fastgen import checkpoints

    prompt = long_ids[:300]   # every class has evicted (windows 16 and 8, budget 40)
    sample = {"temp": 0.0, "repeat_penalty": 1.0}
    plain = Llama(model_path=str(three_class_gguf), **REUSE)
    want = list(itertools.islice(plain.generate(prompt, **sample), 16))

    class TwoRightOneWrong(LlamaDraftModel):
        def __call__(self, input_ids, **kwargs):
            n = len(input_ids) - len(prompt)   # answer tokens sampled so far
            right = want[n:n + 2]
            return np.array(right + [(want[n + 2] + 1) % plain.n_vocab()] if n + 2 < len(want) else right, dtype=np.intc)

    spec = Llama(model_path=str(three_class_gguf), draft_model=TwoRightOneWrong(), logits_all=True, **REUSE)
    got = list(itertools.islice(spec.generate(prompt, **sample), 16))
    assert checkpoints.of(spec).restored >= 4   # a rejected draft at every step
    assert got == want


# ---------------------------------------------------------------- tail rollback in the native cache
UNDO = {"fastgen.undo_tokens": 16}


def _d32_gguf(tiny_d32_model_dir, path, kinds, windows, budgets, heads):
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", kinds), "fastgen.class.window": ("i32[]", windows),
          "fastgen.class.budget": ("i32[]", budgets), "fastgen.layer_class_heads": ("i32[]", heads)}
    return gguf_export.convert(tiny_d32_model_dir, path, "f32", extra_kv=kv)


@pytest.fixture(scope="module")
def three_class_d32_gguf(tiny_d32_model_dir, tmp_path_factory):
    """Full, windowed (16) and heavy-hitter (budget 40) heads of 32 dimensions: the fused op."""
    return _d32_gguf(tiny_d32_model_dir, tmp_path_factory.mktemp("undo") / "three32.gguf", [0, 3, 4], [0, 16, 8],
                     [0, 0, 40], [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1])


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def native_kv_bytes(llm):
    import llama_fastgen

    return llama_fastgen.native.cache_stats(llm)["kv_bytes"]


def test_the_newest_tokens_leave_the_native_cache_as_if_never_evaluated(three_class_d32_gguf, long_ids):
    """llama_fastgen.logits.with_rolled_back_tails: after a 300-token prompt, 160 right tokens arrive in
    steps with 1-5 wrong ones that are evaluated (in one call or token by token) and removed again;
    oracle: a cache that evaluated the right tokens only, in the same calls. Windows (16) and heavy-hitter
    budgets (40) evict all along. (Taking the removed queries' attention out of the scores is what
    matters: without it the same kind of run gave 0.33 of the largest logit and 78 of 141 top-1.)"""
    from llama_fastgen.logits import with_rolled_back_tails

    got, want, rolled, refused = with_rolled_back_tails(three_class_d32_gguf, long_ids, 300, 160, n_ctx=512,
                                                        kv_overrides=UNDO)
    assert refused == 0 and rolled >= 60, (rolled, refused)   # every step (seen: 66)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert _rel(got, want) < 2e-3   # seen: 2.7e-4 (other cell slots: f16 sums of V in another order)


def test_a_step_that_evicted_leaves_again_with_its_eviction_kept(three_class_d32_gguf, long_ids, monkeypatch):
    """As above, but nothing runs the eviction ahead for the first cache (llama-server's drafts, a raw
    llama_decode): its steps evict as they run, so several rolled-back steps evicted heavy-hitter cells
    (the store of 40 + 64 cells drops back to 40 about every 64 tokens). The removal must still succeed:
    the eviction stays, the removed tokens' attention leaves the scores, and the cache equals the second
    one, which ran that same eviction ahead and evaluated the right tokens only."""
    from llama_fastgen import checkpoints
    from llama_fastgen.logits import with_rolled_back_tails

    monkeypatch.setenv(checkpoints.ENV, "0")   # checkpoints would ask make_removable before each step
    got, want, rolled, refused = with_rolled_back_tails(three_class_d32_gguf, long_ids, 300, 160, n_ctx=512,
                                                        ahead=False, kv_overrides=UNDO)
    assert refused == 0 and rolled >= 60, (rolled, refused)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert _rel(got, want) < 2e-3


def test_a_removal_beyond_the_kept_tokens_is_refused_and_changes_nothing(three_class_d32_gguf, long_ids, monkeypatch):
    from llama_fastgen import checkpoints, schema

    monkeypatch.setenv(checkpoints.ENV, "0")
    a = Llama(model_path=str(three_class_d32_gguf), logits_all=True, kv_overrides=UNDO, **REUSE)
    meta = schema.read(three_class_d32_gguf)
    assert native_kv_bytes(a) == sum(schema.kv_bytes(meta, 32, a.n_ctx(), 64, undo_tokens=16))
    a.eval(long_ids[:300])
    for t in long_ids[300:330]:
        a.eval([t])
    assert not a._ctx.kv_cache_seq_rm(-1, 330 - 17, -1)   # 16 tokens' attention is kept, not 17
    assert a._ctx.kv_cache_seq_rm(-1, 330 - 16, -1)
    a.n_tokens = 314
    a.eval(long_ids[314:340])
    b = Llama(model_path=str(three_class_d32_gguf), logits_all=True, kv_overrides=UNDO, **REUSE)
    b.eval(long_ids[:300])
    for t in long_ids[300:314]:
        b.eval([t])
    b.eval(long_ids[314:340])
    assert _rel(a.scores[313:340], b.scores[313:340]) < 2e-3


def test_a_failed_ubatch_leaves_the_native_cache_as_if_never_evaluated(three_class_d32_gguf, long_ids, monkeypatch):
    """llama.cpp removes the positions of a ubatch whose compute failed. Here llama_set_abort_callback stops
    one after half of its graph's nodes, so the heavy-hitter op ran for some layers only: the store takes
    out what those added and nothing else. Oracle: a cache that never saw the failed tokens."""
    import llama_cpp
    from llama_fastgen import checkpoints
    from llama_fastgen._lib import native

    monkeypatch.setenv(checkpoints.ENV, "0")
    a = Llama(model_path=str(three_class_d32_gguf), logits_all=True, kv_overrides=UNDO, **REUSE)
    b = Llama(model_path=str(three_class_d32_gguf), logits_all=True, kv_overrides=UNDO, **REUSE)
    calls = [0, 1 << 30]   # callback calls (one per graph node), abort after this many

    @llama_cpp.ggml_abort_callback
    def stop(_):
        calls[0] += 1
        return calls[0] > calls[1]
    right, wrong = long_ids[330:333], [7, 8, 9]
    for llm in (a, b):
        llm.eval(long_ids[:300])
        for t in long_ids[300:330]:   # the ring of kept attention holds older tokens' in every slot
            llm.eval([t])
        assert native.lib.llama_fastgen_ctx_make_removable(native.ffi.cast("void *", llm._ctx.ctx), 0, 3)
        llama_cpp.llama_set_abort_callback(llm._ctx.ctx, stop, None)
    b.eval(right)
    calls[:] = [0, calls[0] // 2]
    with pytest.raises(RuntimeError, match="llama_decode returned 2"):
        a.eval(wrong)
    assert calls[0] == calls[1] + 1 > 10   # it stopped inside the graph
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(a._ctx.ctx), 0) == 329
    calls[:] = [0, 1 << 30]
    a.eval(right)
    for llm in (a, b):
        for t in long_ids[333:373]:   # the heavy-hitter heads evict at every token: the scores decide
            llm.eval([t])
    assert (a.scores[330:373].argmax(-1) == b.scores[330:373].argmax(-1)).all()
    assert _rel(a.scores[330:373], b.scores[330:373]) < 2e-3


def test_a_windowed_class_takes_back_what_its_window_still_holds(tiny_d32_model_dir, long_ids, tmp_path, monkeypatch):
    """Full and windowed (16) heads, no heavy hitters: a removal is exact while the slice has purged
    nothing a query at the cut would see, and refused once it has."""
    from llama_fastgen import checkpoints

    monkeypatch.setenv(checkpoints.ENV, "0")
    g = _d32_gguf(tiny_d32_model_dir, tmp_path / "win.gguf", [0, 3], [0, 16], [0, 0], [1, 1] * 4)
    a = Llama(model_path=str(g), logits_all=True, **REUSE)
    a.eval(long_ids[:500])     # 256 cells of window slice: it has purged up to about 500 - 256
    assert not a._ctx.kv_cache_seq_rm(-1, 200, -1)
    assert a._ctx.kv_cache_seq_rm(-1, 400, -1)
    a.n_tokens = 400
    a.eval(long_ids[600:620])
    b = Llama(model_path=str(g), logits_all=True, **REUSE)
    b.eval(long_ids[:400])
    b.eval(long_ids[600:620])
    assert _rel(a.scores[399:420], b.scores[399:420]) < 2e-3
    assert (a.scores[399:420].argmax(-1) == b.scores[399:420].argmax(-1)).all()


def test_speculative_decoding_takes_rejected_drafts_back_natively(three_class_d32_gguf, long_ids):
    """Llama(draft_model=...) turns fastgen.undo_tokens on: rejected drafts leave the native cache, no
    checkpoint is saved or restored after the prompt's, and the greedy tokens are those of decoding
    without drafts."""
    import itertools

    from llama_cpp.llama_speculative import LlamaDraftModel
    from llama_fastgen import checkpoints

    prompt = long_ids[:300]
    sample = {"temp": 0.0, "repeat_penalty": 1.0}
    plain = Llama(model_path=str(three_class_d32_gguf), **REUSE)
    want = list(itertools.islice(plain.generate(prompt, **sample), 24))

    class TwoRightOneWrong(LlamaDraftModel):
        def __call__(self, input_ids, **kwargs):
            n = len(input_ids) - len(prompt)
            right = want[n:n + 2]
            return np.array(right + [(want[n + 2] + 1) % plain.n_vocab()] if n + 2 < len(want) else right, dtype=np.intc)

    spec = Llama(model_path=str(three_class_d32_gguf), draft_model=TwoRightOneWrong(), logits_all=True, **REUSE)
    saved = []
    cps = checkpoints.of(spec)
    orig_save = cps.save
    cps.save = lambda: (saved.append(spec.n_tokens), orig_save())[1]
    got = list(itertools.islice(spec.generate(prompt, **sample), 24))
    assert got == want
    # checkpoints: the prompt's two only; before a step the heavy-hitter store would evict for, it evicts
    # first (the same eviction), so every step can be taken back and none is restored
    assert saved == [192, 256] and cps.restored == 0, (saved, cps.restored)


def test_undo_tokens_out_of_range_is_refused_with_the_reason(three_class_d32_gguf):
    with pytest.raises(ValueError, match="fastgen.undo_tokens must be an int from 0 to 256"):
        Llama(model_path=str(three_class_d32_gguf), kv_overrides={"fastgen.undo_tokens": 1000}, **REUSE)


# ---------------------------------------------------------------- layers split over RPC servers

RPC_CLIENT = """
import json, os, sys
import numpy as np
import llama_fastgen
from llama_cpp import Llama
gguf, out, ids, endpoints = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
verbose = os.environ.get("RPC_CLIENT_VERBOSE") == "1"   # llama.cpp's log on stderr
kw = {}
if endpoints:
    from llama_fastgen import rpc
    rpc.add_servers(endpoints)
    kw["n_gpu_layers"] = -1
llm = Llama(model_path=gguf, n_ctx=512, n_batch=64, n_ubatch=64, logits_all=True, verbose=verbose, **kw)
llm.eval(ids[:300])        # ubatches of 64: the composed heavy-hitter path; every class evicts
for t in ids[300:316]:     # one token per call: the fused heavy-hitter op
    llm.eval([t])
np.save(out, llm.scores[:316])
print(json.dumps(llama_fastgen.native.cache_stats(llm)))
"""


def _rpc_run(gguf, out, ids, *endpoints, env=None, log=None):
    r = subprocess.run([sys.executable, "-c", RPC_CLIENT, str(gguf), str(out), json.dumps(ids), *endpoints],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    if log is not None:
        log.append(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


def _start_rpc_server(tmp_path):
    from llama_fastgen import rpc

    log = tmp_path / f"rpc-{len(list(tmp_path.glob('rpc-*.log')))}.log"
    try:
        with log.open("w") as out:
            proc, endpoint = rpc.start_local(threads=1, log=out)
    except rpc.RpcError as e:
        pytest.fail(f"{e}\n{log.read_text()[-2000:]}")
    return endpoint, proc, log


def test_layers_split_over_two_rpc_servers_give_the_logits_of_one_process(three_class_gguf, long_ids, tmp_path):
    """llama.cpp's RPC backend (`llama-fastgen rpc-server` = its rpc-server, `llama_fastgen.rpc.add_servers`
    = its --rpc): the tiny model's layers and their per-class caches split over two local servers. The
    servers run the same CPU code, so the logits equal those of one process (prefill and single-token
    decodes, past every budget)."""
    servers = []
    try:
        for _ in range(2):
            servers.append(_start_rpc_server(tmp_path))
        logs = [log for _, _, log in servers]
        ids = long_ids[:316]
        one_stats, one = _rpc_run(three_class_gguf, tmp_path / "one.npy", ids)
        client_log = []
        split_stats, split = _rpc_run(three_class_gguf, tmp_path / "split.npy", ids,
                                      *(e for e, _, _ in servers),
                                      env={"RPC_CLIENT_VERBOSE": "1", "LLAMA_FASTGEN_INPUT_COPY": ""}, log=client_log)
    finally:
        for _, proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    for log in logs:   # each server took the client's connection (layers assigned to it)
        assert "Accepted client connection" in log.read_text(), log.read_text()[-2000:]
    # the same cache, its bytes now on the servers' devices (RPC0[...], RPC1[...]), adding up to the total
    by_buffer = split_stats.pop("kv_bytes_by_buffer")
    assert one_stats.pop("kv_bytes_by_buffer") == {"CPU": one_stats["kv_bytes"]}
    assert sum(by_buffer.values()) == split_stats["kv_bytes"]
    assert sum(1 for name, n in by_buffer.items() if name.startswith("RPC") and n > 0) == 2, by_buffer
    assert split_stats == one_stats and len(one_stats["classes"]) == 3
    assert (split.argmax(1) == one.argmax(1)).all()
    assert np.abs(split - one).max() <= 1e-5 * np.abs(one).max()
    # a cache over two devices keeps an input each by default: one copy would land on one device only
    assert "instead of" in client_log[0] and ONE_INPUT_LOG not in client_log[0], client_log[0][-3000:]


ONE_INPUT_LOG = "fastgen inputs (indices, masks) are one graph input"


def test_a_cache_in_device_memory_reads_its_inputs_as_one_graph_input_with_the_same_logits(three_class_gguf, long_ids,
                                                                                           tmp_path):
    """Every layer on one RPC server: each slice and heavy-hitter store is in device memory, so by default every
    fastgen input of a ubatch is a view of one graph input (llama-graph-fastgen.cpp, input_blob), copied to that device
    once and read there by the ops on it, as on a GPU (where the scheduler places the CONT is not asserted); the log
    says so. LLAMA_FASTGEN_INPUT_COPY=0 keeps an input each. The same server computes the same ops on the same
    values: the same logits to the bit, prefill (composed heavy-hitter path) and single-token decodes (fused op).
    tests/test_native.py checks the views on the CPU."""
    endpoint, proc, _ = _start_rpc_server(tmp_path)
    logs = []
    pinned = {"RPC_CLIENT_VERBOSE": "1", "LLAMA_FASTGEN_DISABLE": "0", "LLAMA_FASTGEN_HH_FUSED": "1"}  # the paths named above
    try:
        ids = long_ids[:316]
        one_stats, one = _rpc_run(three_class_gguf, tmp_path / "one.npy", ids, endpoint,
                                  env={**pinned, "LLAMA_FASTGEN_INPUT_COPY": ""}, log=logs)
        apart_stats, apart = _rpc_run(three_class_gguf, tmp_path / "apart.npy", ids, endpoint,
                                      env={**pinned, "LLAMA_FASTGEN_INPUT_COPY": "0"}, log=logs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert ONE_INPUT_LOG + ", copied once to the device" in logs[0], logs[0][-3000:]
    assert "instead of" in logs[1] and ONE_INPUT_LOG not in logs[1], logs[1][-3000:]
    by_buffer = one_stats["kv_bytes_by_buffer"]
    assert by_buffer and all(name.startswith("RPC") for name in by_buffer), by_buffer
    assert one_stats == apart_stats and len(one_stats["classes"]) == 3
    assert np.array_equal(one, apart)


def test_a_cache_in_host_memory_keeps_an_input_each_unless_told(three_class_gguf, long_ids, tmp_path):
    """On the CPU (host memory) the default keeps llama.cpp's graph input per fastgen input: a copy buys nothing
    there. =1 forces the one input on any backend (its views are what tests/test_native.py checks to the bit)."""
    logs = []
    ids = long_ids[:300]
    for name, value in (("cpu.npy", ""), ("cpu1.npy", "1")):
        _rpc_run(three_class_gguf, tmp_path / name, ids, log=logs,
                 env={"RPC_CLIENT_VERBOSE": "1", "LLAMA_FASTGEN_DISABLE": "0", "LLAMA_FASTGEN_INPUT_COPY": value})
    assert "instead of" in logs[0] and ONE_INPUT_LOG not in logs[0], logs[0][-3000:]
    assert ONE_INPUT_LOG + " (LLAMA_FASTGEN_INPUT_COPY=1)" in logs[1], logs[1][-3000:]


RPC_GONE = """
import os, signal, sys, time
import llama_fastgen
from llama_fastgen import rpc
from llama_cpp import Llama
gguf, endpoint, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
rpc.add_servers([endpoint])
os.kill(pid, signal.SIGKILL)      # the server stops after its devices were registered
time.sleep(1)
try:
    Llama(model_path=gguf, n_ctx=256, n_gpu_layers=-1, verbose=False)
except rpc.RpcError as e:
    print("refused:", e)
"""


def test_a_model_load_after_an_rpc_server_stopped_is_refused_not_aborted(three_class_gguf, tmp_path):
    """llama.cpp's RPC client aborts the process when a registered server is gone; every model load asks the
    registered servers first, so the caller gets the reason instead."""
    endpoint, proc, _ = _start_rpc_server(tmp_path)
    try:
        r = subprocess.run([sys.executable, "-c", RPC_GONE, str(three_class_gguf), endpoint, str(proc.pid)],
                           capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"refused: no RPC server answers at {endpoint}" in r.stdout, r.stdout + r.stderr[-2000:]


def test_an_rpc_server_that_does_not_answer_is_refused_with_the_reason():
    from llama_fastgen import rpc

    with pytest.raises(rpc.RpcError, match="no RPC server answers at 127.0.0.1"):
        rpc.add_servers([f"127.0.0.1:{free_port()}"])
