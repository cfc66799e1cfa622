"""Evaluation harness: its numbers come from real runs (full vs itself is exact, a tiny window is worse)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from llama_fastgen.converter import gguf_export
from llama_fastgen.evaluation import configs, measure, tasks

EVAL = Path(__file__).resolve().parent.parent / "scripts" / "eval.py"


@pytest.fixture(scope="module")
def tiny_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)(tasks.held_out_text())["input_ids"][:500]


def test_full_cache_scores_kl_zero_and_full_agreement(tiny_model_dir, tiny_ids, tmp_path):
    g = gguf_export.convert_stock(tiny_model_dir, tmp_path / "tiny.gguf", "f32")
    a, st = measure.run_config(g, tiny_ids, 512, fastgen=False, kv_q8=False)
    b, _ = measure.run_config(g, tiny_ids, 512, fastgen=False, kv_q8=False)
    r = measure.compare(a, b, tiny_ids, 100)
    assert r["kl_mean"] == 0.0 and r["top1"] == 1.0 and r["positions"] == 399
    assert st["kv_bytes"] == st["full_bytes"] == 4 * 2 * 8 * 2 * 2 * 512  # layers x kv heads x head_dim x K,V x f16


def test_a_four_token_window_scores_visibly_worse(model_dir, tmp_path):
    """On the real default model (a random tiny model attends almost uniformly, so it cannot tell)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(tasks.held_out_text())["input_ids"][:500]
    g = gguf_export.convert_stock(model_dir, tmp_path / "smol.gguf", "f32")
    full, _ = measure.run_config(g, ids, 512, fastgen=False, kv_q8=False)
    bad = configs.uniform_gguf(model_dir, 4, 0.0, tmp_path / "w4.gguf")
    logits, st = measure.run_config(bad, ids, 512, fastgen=True, kv_q8=False)
    r = measure.compare(full, logits, ids, 100)
    assert st["fastgen"] and st["kv_bytes"] < st["full_bytes"]
    assert r["kl_mean"] > 0.01 and r["top1"] < 0.95


def test_passkey_task_is_solved_with_the_full_cache_and_lost_without_the_history(model_dir, tmp_path):
    """The synthetic retrieval task is a real test: the full cache finds the key, a cache that keeps
    only sinks and 16 recent tokens cannot (the key sits in the middle of the filler)."""
    import llama_fastgen  # noqa: F401
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    g = gguf_export.convert_stock(model_dir, tmp_path / "smol.gguf", "f32")
    small = configs.uniform_gguf(model_dir, 16, 0.0, tmp_path / "w16.gguf", punct=False)
    found = {}
    for name, path in (("full", g), ("window16", small)):
        llm = Llama(model_path=str(path), n_ctx=1100, n_batch=512, verbose=False, flash_attn=True)
        try:
            found[name] = [p.key in tasks.answer(llm, p.ids) for p in
                           (tasks.make("passkey", tok, 1000, i, 3) for i in range(3))]
        finally:
            llm.close()
    assert all(found["full"]) and not any(found["window16"]), found


def test_quick_evaluation_runs_end_to_end_with_fair_baselines(tmp_path):
    """scripts/eval.py --quick on the default model: every baseline within 2% of fastgen's bytes,
    Wilson intervals around every accuracy, q8_0 closer to the full cache than q4_0."""
    import json
    import subprocess
    import sys

    out = tmp_path / "quick.json"
    r = subprocess.run([sys.executable, str(EVAL), "--quick", "--json", str(out), "--markdown",
                        str(tmp_path / "quick.md"), "--workdir", str(tmp_path / "work")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["commit"] and res["machine"]["cores"] and res["command"].startswith("python scripts/eval.py --quick")
    mem = {m["config"]: m["kv_bytes"] for m in res["memory_at_ctx"]}
    fg = mem["fastgen T=0.8"]
    fams = {c: next(q["family"] for q in res["quality"] if q["config"] == c) for c in mem}
    for fam in ("StreamingLLM", "H2O", "DuoAttention-style", "random-Duo"):
        name = next(c for c, f in fams.items() if f == fam)
        assert abs(mem[name] / fg - 1) <= 0.02, (name, mem[name], fg)
    kl = {q["config"]: q["kl_mean"] for q in res["quality"]}
    assert 0 < kl["full q8_0"] < kl["full q4_0"]
    # Wilson score intervals of 4 trials, written out (z = 1.96): k = 0..4
    wilson4 = {0: (0.0, 0.490), 1: (0.046, 0.699), 2: (0.150, 0.850), 3: (0.301, 0.954), 4: (0.510, 1.0)}
    for x in res["retrieval"]:
        assert x["trials"] == 4 and len(x["hits"]) == 4 and sum(x["hits"]) == x["correct"]
        assert x["accuracy"] == x["correct"] / 4 and x["ci95"] == pytest.approx(wilson4[x["correct"]], abs=1e-3)
    full = next(x for x in res["retrieval"] if x["config"] == "full f16")
    assert full["correct"] >= 3
    md = (tmp_path / "quick.md").read_text()
    assert "| fastgen T=0.8 |" in md and "[" in md


def test_a_results_files_command_names_the_switches_it_ran_under(monkeypatch):
    # session 37's and 38's A/B runs exported a switch and their files' commands did not show it
    from llama_fastgen.evaluation.report import command_line

    for k in [k for k in os.environ if k.startswith(("LLAMA_FASTGEN_", "GGML_"))]:
        monkeypatch.delenv(k)
    assert command_line(["python", "scripts/bench_gpu.py", "speed", "--configs", "full f16"]) == \
        "python scripts/bench_gpu.py speed --configs 'full f16'"
    monkeypatch.setenv("LLAMA_FASTGEN_CUDA_STREAMS", "0")
    monkeypatch.setenv("GGML_CUDA_PDL", "0")
    monkeypatch.setenv("LLAMA_FASTGEN_CACHE", "/tmp/fgcache")  # where the build lives, not a switch
    monkeypatch.setenv("LLAMA_FASTGEN_COMMIT", "abc")           # the commit measured, recorded on its own
    assert command_line(["python", "x.py", "--n", "4"]) == \
        "GGML_CUDA_PDL=0 LLAMA_FASTGEN_CUDA_STREAMS=0 python x.py --n 4"
    monkeypatch.setenv("GGML_CUDA_PDL", "a b")  # quoted as a shell assignment: GGML_CUDA_PDL='a b'
    assert command_line(["x.py"]) == "GGML_CUDA_PDL='a b' LLAMA_FASTGEN_CUDA_STREAMS=0 x.py"
