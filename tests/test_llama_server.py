"""llama.cpp's own llama-server on our libllama (scripts/build_tools.sh) with parallel slots: four
concurrent greedy requests must give the answers of the same four requests one by one (the oracle of
issue 15: several sequences decoded together = each alone), with the fastgen cache on, for both of
llama.cpp's KV layouts (a stream per slot, and one unified buffer), with static classes and with
heavy-hitter heads (a store per slot). Where the heavy-hitter op cannot run (heads of 8 dimensions),
the server must stop with the reason instead of serving something else."""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_fastgen import schema
from llama_fastgen.converter import gguf_export
from test_native import TINY_BASE
from helpers import ServerProcess, free_port
from test_serving import mixed_gguf  # noqa: F401  (the heavy-hitter fixture)

REPO = Path(__file__).resolve().parent.parent
# ~250-300 tokens each, past the window (16) of the compressed class, so every slot evicts
PROMPTS = [f"List {k}: " + ", ".join(f"item {i} is {(i * (k + 3)) % 13}" for i in range(36)) + f". Which item is {k}?"
           for k in range(4)]
GREEDY = {"n_predict": 24, "temperature": 0.0, "seed": 7, "cache_prompt": False}
# ~50 tokens each: heavy-hitter eviction (at 40 + 32 cells) starts while decoding, one token per slot
# and step alone or together; in a prompt it would run per ubatch, and slots prefilled together get
# other ubatches than one alone (llama.cpp's equal split), so other evictions (tests/test_sequences.py
# checks that case with the ubatches matched)
SHORT = [f"Note {k}: " + ", ".join(f"{i} is {(i * (k + 3)) % 13}" for i in range(8)) + f". Which is {k}?" for k in range(4)]


@pytest.fixture(scope="module")
def server_bin() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "build_tools.sh"), "llama-server"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-server"


@pytest.fixture(scope="module")
def static_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model with a full and a windowed class in every layer (no heavy hitters)."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [0, 3]), "fastgen.class.window": ("i32[]", [0, 16]),
          "fastgen.layer_class_heads": ("i32[]", [1, 1] * 4)}
    return gguf_export.convert(tiny_model_dir, tmp_path_factory.mktemp("llama-server") / "static.gguf", "f32", extra_kv=kv)


@pytest.fixture(scope="module")
def heavy_gguf(tiny_d32_model_dir, tmp_path_factory):
    """The 32-dimension tiny model with a windowed and a heavy-hitter class (40 cells) in every layer."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [3, 4]), "fastgen.class.window": ("i32[]", [16, 8]),
          "fastgen.class.budget": ("i32[]", [0, 40]), "fastgen.layer_class_heads": ("i32[]", [1, 1] * 4)}
    return gguf_export.convert(tiny_d32_model_dir, tmp_path_factory.mktemp("llama-server") / "heavy.gguf", "f32", extra_kv=kv)


class LlamaServer(ServerProcess):
    def __init__(self, binary, gguf, log, *args):
        self.port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-c", "2048",
               "-ub", "64", "-b", "256", "-t", str(os.cpu_count() or 2), "--no-warmup", "-lv", "4", *args]
        self.start(cmd, log, dict(os.environ, LD_LIBRARY_PATH=str(binary.parent)))

    def request(self, prompt: str, **opts) -> dict:
        body = json.dumps({"prompt": prompt, "return_tokens": True, **GREEDY, **opts}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def complete(self, prompt: str, **opts) -> list[int]:
        return self.request(prompt, **opts)["tokens"]



@pytest.mark.parametrize("layout", ["per-slot", "unified"])
def test_four_parallel_slots_answer_as_one_request_at_a_time(server_bin, static_gguf, tmp_path, layout):
    _four_slots(server_bin, static_gguf, tmp_path, layout)
    log = (tmp_path / "server.log").read_text()
    # the per-class cache served them (its log lines), the compressed class sized by the formula for
    # 4 sequences in one buffer, or for one per stream of n_ctx / 4
    cells = re.search(r"class 1 special\+punct\+local16 +4 heads, +(\d+) cells", log)
    assert cells and "instead of" in log, log[-3000:]
    meta = schema.read(static_gguf)
    expect = (schema.class_capacity(meta, 1, 2048, 64, n_seq=4) if layout == "unified"
              else schema.class_capacity(meta, 1, 2048 // 4, 64))
    assert int(cells.group(1)) == expect


@pytest.mark.parametrize("layout", ["per-slot", "unified"])
def test_four_parallel_slots_with_heavy_hitter_heads_answer_as_one_at_a_time(server_bin, heavy_gguf, tmp_path, layout):
    """Each slot's heavy-hitter store evicts by its own sequence's attention while the slots decode
    together (40 tokens per answer: an eviction in every slot)."""
    _four_slots(server_bin, heavy_gguf, tmp_path, layout, SHORT, {"n_predict": 40})
    log = (tmp_path / "server.log").read_text()
    # a store per sequence in either layout, each of the capacity one sequence's store takes
    cells = re.search(r"class 1 special\+frequent40\+local8 +4 heads, +(\d+) cells", log)
    assert cells and "instead of" in log, log[-3000:]
    assert int(cells.group(1)) == schema.class_capacity(schema.read(heavy_gguf), 1, 2048 if layout == "unified" else 512, 64)


def _four_slots(server_bin, gguf, tmp_path, layout, prompts=PROMPTS, opts=None):
    srv = LlamaServer(server_bin, gguf, tmp_path / "server.log", "-np", "4", "-kvu" if layout == "unified" else "-no-kvu")
    complete = lambda p: srv.complete(p, **(opts or {}))
    try:
        assert srv.wait_ready(), srv.stop()[-3000:]
        alone = [complete(p) for p in prompts]
        with ThreadPoolExecutor(4) as ex:
            together = list(ex.map(complete, prompts))
    finally:
        srv.stop()
    assert all(len(a) == {**GREEDY, **(opts or {})}["n_predict"] for a in alone), alone
    assert together == alone


def test_parallel_slots_where_the_heavy_hitter_op_cannot_run_stop_with_the_reason(server_bin, mixed_gguf, tmp_path):  # noqa: F811
    srv = LlamaServer(server_bin, mixed_gguf, tmp_path / "server.log", "-np", "4")
    ready = srv.wait_ready()
    log = srv.stop()
    assert not ready and srv.proc.returncode not in (0, None)
    assert "only through the fused op" in log and "n_seq_max = 1" in log, log[-3000:]


@pytest.mark.parametrize("fixture", ["static_gguf", "heavy_gguf"])
def test_a_slot_reuses_its_prompt_only_where_the_cache_can_roll_back(server_bin, fixture, tmp_path, request):
    """llama-server keeps each slot's tokens (cache_prompt, its default) and, for a new prompt that
    shares a prefix, removes the rest with a call whose refusal it ignores; it asks seq_pos_min
    how far back the cache can be cut. A compressed cache cannot drop evicted history: windowed heads
    answer from where their windows are whole (the server cuts there), heavy-hitter heads without
    fastgen.undo_tokens like a recurrent memory (its newest position: the server restores one of its
    context checkpoints). Oracle: the second prompt answered as by a fresh slot."""
    gguf = request.getfixturevalue(fixture)
    first, second = PROMPTS[0], PROMPTS[0][:-12] + " Which is 3?"  # a shared prefix of ~280 tokens
    srv = LlamaServer(server_bin, gguf, tmp_path / "server.log", "-np", "1")
    try:
        assert srv.wait_ready(), srv.stop()[-3000:]
        fresh = srv.request(second, cache_prompt=False)
        srv.complete(first, cache_prompt=True)
        reused = srv.request(second, cache_prompt=True)
        again = srv.request(second, cache_prompt=True)  # the same prompt once more: its last token again
    finally:
        srv.stop()
    assert reused["tokens"] == fresh["tokens"] and again["tokens"] == fresh["tokens"]
    # and the prompt was reused: cut natively where the windows allow (static classes), from a checkpoint
    # where heavy-hitter heads cannot take tokens back; the shared prefix is not evaluated again
    n = lambda r: r["timings"]["prompt_n"]
    assert n(fresh) == fresh["tokens_evaluated"] and n(reused) < n(fresh) // 2 and n(again) < n(fresh) // 2, \
        (n(fresh), n(reused), n(again))


@pytest.fixture(scope="module")
def smollm2_gguf(model_dir, tmp_path_factory):
    """The default model converted with its default profile's table (no profiling: --policies)."""
    from llama_fastgen.converter import convert

    out = tmp_path_factory.mktemp("llama-server") / "smollm2-B0.30.gguf"
    assert convert.main([str(model_dir), "--profile", "--policies", str(REPO / "docs" / "results" / "smollm2-B0.30.fastgen.json"),
                         "--outfile", str(out)]) == 0
    return out


def test_drafts_leave_natively_with_kept_attention_and_answer_as_without_drafts(server_bin, smollm2_gguf, tmp_path):
    """With fastgen.undo_tokens >= a draft step's tokens, llama-server's start-up probe (two tokens, the
    second removed) finds that a slot can drop its newest tokens, so it checks its n-gram drafts in one
    batch and removes the rejected ones with seq_rm, which llama.cpp's common code aborts on when it is
    refused. Such steps used to be refused where a heavy-hitter store evicted for them, where a protected
    token stood in a window, and in the probe itself. Oracle: the same server without drafts gives the
    same greedy tokens (the default model copying a list, so that drafts are both taken and rejected)."""
    items = "\n".join(f"{i}. The {c} box holds {3 * i + 3} marbles." for i, c in
                      enumerate(["red", "blue", "green", "yellow", "black", "white", "pink", "gray", "brown", "orange"] * 3))
    prompt = f"Here is a list:\n{items}\n\nCopy the list exactly.\n\n0. The red box"
    opts = {"n_predict": 200}
    spec = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m", "8",
            "--override-kv", "fastgen.undo_tokens=int:16"]
    answers, drafts = [], None
    for i, extra in enumerate(([], spec)):
        srv = LlamaServer(server_bin, smollm2_gguf, tmp_path / f"server{i}.log", "-np", "1", *extra)
        try:
            assert srv.wait_ready(), srv.stop()[-3000:]
            r = srv.request(prompt, **opts)
        finally:
            log = srv.stop()
        answers.append(r["tokens"])
        if extra:
            assert "will use checkpoints" not in log, log[-3000:]   # the probe found that a tail can go
            drafts = (r["timings"].get("draft_n", 0), r["timings"].get("draft_n_accepted", 0))
    assert drafts[0] > drafts[1] > 0, drafts   # drafts were checked, and some taken back
    assert len(answers[0]) == opts["n_predict"] and answers[1] == answers[0]
