"""Foundation: our libllama is the one in use, it answers through cffi, and it computes like HF."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_fastgen
from helpers import hf_logits, llama_logits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "native"))
import llama_cpp_tree  # noqa: E402


def test_native_library_is_ours_and_reports_itself():
    n = llama_fastgen.native
    assert n.version() == llama_fastgen.__version__
    assert n.llama_commit() == llama_cpp_tree.LLAMA_CPP_COMMIT
    assert "CPU" in n.backends()
    loaded = Path(llama_fastgen.llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded.parent == llama_fastgen.lib_dir()


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "llama_fastgen", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert f"llama-fastgen {llama_fastgen.__version__}" in out
    assert llama_cpp_tree.LLAMA_CPP_COMMIT in out
    backends = next(ln for ln in out.splitlines() if ln.startswith("backends: "))[10:].split(", ")
    assert "CPU" in backends and "RPC" in backends   # the RPC backend is part of the build (llama_fastgen.rpc)


@pytest.mark.parametrize("args,expect", [
    (["inspect", "{cut}"], "not a readable GGUF file"),
    (["chat", "{cut}", "--prompt", "hi"], "not a readable GGUF file"),
    (["inspect", "{dir}"], "is a directory, not a GGUF file"),
    (["inspect", "{cut}", "--ctx", "0"], "expected 1 to 16777216 tokens of context, got 0"),
    (["chat", "{cut}", "--n-ctx", "-5"], "expected 1 to 16777216 tokens of context, got -5"),
    (["rpc-server", "--port", "70000"], "expected 1 to 65535 (a TCP port), got 70000"),
    (["serve", "{gguf}", "--port", "1"], "LLAMA_FASTGEN_CHECKPOINTS='two': expected a number of checkpoints"),
])
def test_cli_says_what_is_wrong_without_a_traceback(args, expect, tmp_path, stock_gguf):
    cut = tmp_path / "cut.gguf"
    with open(stock_gguf, "rb") as f:
        cut.write_bytes(f.read(1000))                  # a download that stopped early
    args = [a.format(cut=cut, dir=tmp_path, gguf=stock_gguf) for a in args]
    env = dict(os.environ, LLAMA_FASTGEN_CHECKPOINTS="two")   # only the serve case gets that far
    r = subprocess.run([sys.executable, "-m", "llama_fastgen", *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_an_rpc_server_on_a_port_in_use_says_so():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llama_fastgen", "rpc-server", "--port", str(port)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r.stderr[-2000:]


def test_chat_takes_turns_from_standard_input_when_asked_and_never_waits_on_it_otherwise(stock_gguf):
    run = [sys.executable, "-m", "llama_fastgen", "chat", str(stock_gguf), "--max-tokens", "4", "--n-ctx", "512"]
    piped = subprocess.run(run + ["--prompt", "-"], input="Name a color.\n\nName a fruit.\n", capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert [ln for ln in piped.stdout.splitlines() if ln.startswith("you> ")] == ["you> Name a color.", "you> Name a fruit."]
    # a pipe nobody writes to or closes (a CI runner, ssh without a terminal): the demo turns, no wait
    r, w = os.pipe()
    try:
        demo = subprocess.run(run, stdin=r, capture_output=True, text=True, timeout=300)
    finally:
        os.close(r), os.close(w)
    assert demo.returncode == 0 and "--prompt - reads turns from it" in demo.stdout, demo.stderr[-2000:]
    assert "you> What is the capital of France?" in demo.stdout


def test_the_converter_never_loads_libllama_and_llama_cpp_loads_ours_when_imported():
    """A CUDA libllama loaded before torch makes torch's import abort (seen on the H200), so
    importing llama_fastgen and the converter, and sizing a policy, must not load it; llama_cpp imported afterwards
    still runs on our library, with our load errors explained."""
    code = ("import sys, llama_fastgen, llama_fastgen.converter.convert, llama_fastgen.schema, torch\n"
            "p = llama_fastgen.schema.HeadPolicy(llama_fastgen.schema.Kind.FREQUENT, 8, 64)\n"
            "assert p.at_context(4096, 1024, 4) == llama_fastgen.schema.HeadPolicy(p.kind, 32, 256)\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libfastgen-contract' in maps   # the sizing rules run without libllama\n"
            "assert 'llama_cpp' not in sys.modules and 'libllama' not in maps and 'libggml' not in maps, 'libllama loaded'\n"
            "from llama_cpp import Llama\n"
            "import llama_cpp._internals as I\n"
            "assert str(llama_fastgen.lib_dir() / 'libllama.so') in open('/proc/self/maps').read()\n"
            "assert I.LlamaModel.__init__._fastgen and I.LlamaContext.__init__._fastgen\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_foreign_library_is_refused_clearly():
    env = dict(os.environ, LLAMA_CPP_LIB_PATH="/nonexistent/lib")
    r = subprocess.run([sys.executable, "-c", "import llama_fastgen"], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "LLAMA_CPP_LIB_PATH=/nonexistent/lib points at another libllama" in r.stderr
    # our commands say it in one line, no traceback: the console scripts and python -m
    bindir = Path(sys.executable).parent
    for cmd in ([str(bindir / "llama-fastgen"), "--version"], [str(bindir / "llama-fastgen-convert"), "--help"],
                [sys.executable, "-m", "llama_fastgen", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
        assert r.stderr.startswith("llama-fastgen: error: LLAMA_CPP_LIB_PATH=/nonexistent/lib points at another "
                                   "libllama") and r.stderr.count("\n") == 1, (cmd, r.stderr)


def test_stock_gguf_logits_match_transformers(model_dir, stock_gguf):
    """Pinned converter + our libllama vs HF transformers on the same 300 tokens of real text."""
    from transformers import AutoTokenizer

    text = (REPO / "converter" / "calibration" / "prose.txt").read_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"][:300]
    ref = hf_logits(model_dir, ids)
    for fa in (False, True):
        got = llama_logits(stock_gguf, ids, flash_attn=fa)
        top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
        assert top1 >= 0.95, f"flash_attn={fa}: top-1 agreement {top1:.3f}"
        # measured: max |diff| 0.026 (no FA) / 0.087 (FA), mean 0.003 on 49k logits x 300 positions
        assert np.abs(got - ref).max() < 0.25
        assert np.abs(got - ref).mean() < 0.02


def test_sdist_with_wrong_hash_is_refused(tmp_path):
    bogus = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bogus.write_bytes(b"not the sdist")
    with pytest.raises(llama_cpp_tree.TreeError, match="wrong sha256"):
        llama_cpp_tree.fetch(bogus)


def test_patch_that_does_not_apply_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.cpp").write_text("int a = 1;\n")
    patch = tmp_path / "0001-bad.patch"
    patch.write_text("--- a/src/a.cpp\n+++ b/src/a.cpp\n@@ -1 +1 @@\n-int a = 2;\n+int a = 3;\n")
    with pytest.raises(llama_cpp_tree.TreeError, match="does not apply"):
        llama_cpp_tree._apply(patch, tmp_path)
    assert (tmp_path / "src" / "a.cpp").read_text() == "int a = 1;\n"


def test_python_reads_the_contract_and_declarations_the_native_code_is_compiled_with():
    """Every #define of the contract header reaches Python (numbers, GGUF keys, class kinds: schema's
    constants, KEYS and Kind; the native loader's refusals at these bounds: test_native HOSTILE), its
    functions run from libfastgen-contract, which libllama links, and cffi binds every function
    the C API header declares; the installed package carries the source tree's copies."""
    import re

    from llama_fastgen import contract, headers, schema

    # the wheel carries both headers (its RECORD; the development install then links them to the tree's)
    import importlib.metadata

    shipped = {str(f) for f in importlib.metadata.files("llama-fastgen")}
    for name in ("llama-fastgen-contract.h", "llama-fastgen.h"):
        assert f"llama_fastgen/{name}" in shipped and headers.find(name).parent.name == "llama_fastgen"
    src = (REPO / "native" / "include" / "llama-fastgen-contract.h").read_text()
    lines = re.findall(r"^#define LLAMA_FASTGEN_(\w+) (.+)$", src, re.M)
    c = headers.contract()
    assert len(lines) >= 30 and {k for k, _ in lines} == set(c)
    assert all(str(c[k]) == v.strip('"') for k, v in lines)
    assert {f"KIND_{k.name}": int(k) for k in schema.Kind} == {k: v for k, v in c.items() if k.startswith("KIND_")}
    # a label per kind, read back by the label parser as the kind (the native loader prints the same: test_native)
    assert len(schema.Kind) == c["N_KINDS"] and all(c[f"LABEL_{k.name}"] for k in schema.Kind)
    for p in (schema.HeadPolicy(schema.Kind.FULL), schema.HeadPolicy(schema.Kind.SPECIAL, 1),
              schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT, 1), schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, 128),
              schema.HeadPolicy(schema.Kind.FREQUENT, 128, 512)):
        assert schema.HeadPolicy.from_label(p.label) == p
    assert schema.KEYS and all(v.startswith(c["KEY_PREFIX"]) for v in schema.KEYS.values())
    meta = schema.FastgenMetadata(threshold=0.9, n_sink=4, classes=[schema.HeadPolicy(schema.Kind.FULL)],
                                  layer_class_heads=[[1]], head_perm=[[0]], special_token_ids=[1], punct_token_ids=[2],
                                  protected_frac=0.1, budget_ctx=512)
    # every key written, each from the header; the kv overrides are not written
    assert set(meta.to_kv()) == set(schema.KEYS.values()) - {c["KEY_ENABLE"], c["KEY_UNDO_TOKENS"]}
    declared = re.findall(r"^LLAMA_FASTGEN_CONTRACT_API[^(]*?\b(llama_fastgen_\w+)\s*\(", src, re.M)
    assert declared == ["llama_fastgen_class_cells", "llama_fastgen_class_at_context", "llama_fastgen_class_problem"]
    assert all(getattr(contract._lib()[1], n) for n in declared)
    # whether a class can load, the rule written out (kind, window, budget, n_sink): frequent budgets above
    # n_sink + window, full windows 0, others 1 to MAX_CELLS, a budget only for frequent classes
    K = schema.Kind
    for args, why in (((K.FREQUENT, 16, 65, 48), 0), ((K.FREQUENT, 16, 64, 48), "CLASS_BAD_BUDGET"),
                      ((K.FREQUENT, 16, c["MAX_CELLS"] + 1, 4), "CLASS_BAD_BUDGET"), ((K.FULL, 0, 0, 4), 0),
                      ((K.FULL, 1, 0, 4), "CLASS_BAD_WINDOW"), ((K.SPECIAL_PUNCT_LOCAL, 0, 0, 4), "CLASS_BAD_WINDOW"),
                      ((K.SPECIAL_PUNCT_LOCAL, 8, 5, 4), "CLASS_STRAY_BUDGET"), ((9, 1, 0, 4), "CLASS_BAD_KIND")):
        assert contract.class_problem(int(args[0]), *args[1:]) == (c[why] if why else 0), (args, why)
    libllama = (llama_fastgen.lib_dir() / "libllama.so").read_bytes()
    assert b"libfastgen-contract" in libllama   # linked (DT_NEEDED), not compiled in a second time
    api = (REPO / "native" / "include" / "llama-fastgen.h").read_text()
    names = re.findall(r"^LLAMA_API[^(]*?\b(llama_fastgen_\w+)\s*\(", api, re.M)
    assert len(names) >= 14 and all(getattr(llama_fastgen.native.lib, n) for n in names)


def test_contract_sizes_follow_the_rule_the_header_states():
    """The oracle of llama_fastgen_class_cells and llama_fastgen_class_at_context: the rule as the
    contract header's comments state it, written out here, on 5,000 random classes and contexts (the
    native allocator's bytes are checked against these sizes in test_native and test_sequences)."""
    import math
    import random

    from llama_fastgen import contract, schema

    from llama_fastgen import headers

    c, K = headers.contract(), schema.Kind
    rng = random.Random(1)
    for _ in range(5000):
        kind = rng.choice(list(K))
        n_sink, n_ctx = rng.choice([0, 4, 100]), rng.choice([64, 1000, 4096, 65536, 1 << 20])
        window = 0 if kind == K.FULL else rng.choice([1, 16, 300, 5000])
        budget = n_sink + window + rng.choice([1, 100, 30000]) if kind == K.FREQUENT else 0
        pf = float(np.float32(rng.random()))      # a GGUF stores it as f32
        n_ub, n_seq, bctx = rng.choice([1, 64, 512]), rng.choice([1, 3]), rng.choice([0, 256, 4096])
        if kind == K.FULL:
            want = n_ctx
        elif kind == K.FREQUENT:
            want = min(n_ctx, budget + max(n_ub, c["FREQUENT_EVICT_BATCH"]))
        else:
            share = (c["SPECIAL_SHARE_PERMILLE"] / 1000 if kind == K.SPECIAL else
                     min(1.0, c["PROTECTED_MARGIN_PERMILLE"] / 1000 * pf + c["PROTECTED_EXTRA_PERMILLE"] / 1000))
            need = min(n_ctx, n_seq * (n_sink + window + c["SLICE_SLACK"]) + n_ub + math.ceil(share * n_ctx))
            want = min(n_ctx, -(-need // c["SLICE_PAD"]) * c["SLICE_PAD"])
        assert contract.class_cells(int(kind), window, budget, n_sink, pf, n_ctx, n_ub, n_seq) == want
        w, b = window, budget
        if bctx and n_ctx > bctx and kind in (K.FREQUENT, K.SPECIAL_PUNCT_LOCAL):
            grow = lambda v: min(c["MAX_CELLS"], v * n_ctx // bctx)   # noqa: E731
            b = grow(budget) if kind == K.FREQUENT else budget
            w = min(grow(window), b - n_sink - 1) if kind == K.FREQUENT else grow(window)
        assert contract.class_at_context(int(kind), window, budget, n_sink, n_ctx, bctx) == (w, b)
