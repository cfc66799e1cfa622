"""Fuzzing (issue 16): 500 seeded mutants of a fastgen GGUF's metadata, each loaded by the native
loader and by the Python reader in worker processes. Every load succeeds on both sides with the
same policy or fails on both with a clean error; no signal, abort or hang. The mutation engine and
the judge live in scripts/fuzz_gguf.py, which runs the same rules longer."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fuzz_gguf  # noqa: E402

from llama_fastgen.converter import gguf_export  # noqa: E402

COUNT, SEED = 500, 1234


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    # one run of the pinned converter, with the engine's valid policy (its token ids fit the
    # shrunk vocabulary too); the mutants only rewrite the metadata of this file
    policy = fuzz_gguf.policy(n_layer=4, n_head_kv=2, n_vocab=fuzz_gguf.N_VOCAB)
    src = gguf_export.convert(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "tiny-fg.gguf", "f32", extra_kv=policy)
    base = fuzz_gguf.Base(src)
    assert (base.n_layer, base.n_head_kv, base.n_vocab) == (4, 2, fuzz_gguf.N_VOCAB)
    return base


def test_mutated_metadata_loads_alike_in_both_loaders_or_fails_cleanly(base, tmp_path):

    t0 = time.time()
    control = {"id": -1, "desc": "the valid policy, rewritten", "kv": base.policy(), "container_ok": True}
    control, *recs = fuzz_gguf.run(base, [control, *fuzz_gguf.mutants(base, COUNT, SEED)], tmp_path)
    report = fuzz_gguf.summary(recs)
    print(f"\n{report}\n{COUNT} mutants in {time.time() - t0:.0f} s")

    # the unmutated policy loads on both sides with its three classes: the refusals are the mutations'
    assert control["native"] == "ok" and len(control["native_classes"]) == 3, control
    assert not fuzz_gguf.problems(control), control
    # the mutations reach both verdicts: some are harmless, most are not
    verdicts = {(r.get("py"), r.get("native")) for r in recs}
    assert {("ok", "ok"), ("refused", "refused")} <= verdicts, report
    assert not any(fuzz_gguf.problems(r) for r in recs), report


@pytest.mark.parametrize("cut,expect", [
    (("general.architecture",), "has no general.architecture: not a complete model file"),
    (("llama.attention.key_length", "llama.embedding_length"), "has no llama.embedding_length: not a complete model file"),
    (("llama.attention.key_length", "llama.attention.head_count=0"), "llama.attention.head_count = 0, expected a positive integer"),
])
def test_a_fastgen_gguf_missing_model_keys_is_named_not_a_traceback(base, tmp_path, cut, expect):
    """The model keys the CLI reads beside the policy (inspect sizes heads from them): a key missing or
    0 is one error line that names it."""
    import copy

    b = copy.copy(base)
    b.kv = dict(base.kv)
    for key in cut:
        key, _, zero = key.partition("=")
        if zero:
            b.kv[key] = (b.kv[key][0], 0)
        else:
            b.kv.pop(key, None)
    path = b.write(tmp_path / "m.gguf", base.policy())
    r = subprocess.run([sys.executable, "-m", "llama_fastgen", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_llamas_own_refusal_of_a_file_reaches_the_error_with_verbose_off(base, tmp_path):
    """A file llama.cpp itself refuses (here a feed-forward length its tensors do not have): its reason, an
    error line that llama-cpp-python's verbose=False sends to /dev/null, ends the ValueError's message."""
    import copy

    b = copy.copy(base)
    b.kv = dict(base.kv)
    typ, n_ff = b.kv["llama.feed_forward_length"]
    b.kv["llama.feed_forward_length"] = (typ, 2 * n_ff)
    path = b.write(tmp_path / "m.gguf", base.policy())
    code = ("import llama_fastgen, sys\nfrom llama_cpp import Llama\n"
            "try:\n    Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)\nexcept ValueError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Failed to load model from file: ") and "has wrong shape" in r.stdout, r.stdout
    assert "ffn" in r.stdout and r.stdout.count("\n") == 1, r.stdout

