"""Converter: permutation is lossless, metadata round-trips, thresholds behave, reference is exact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import llama_logits
from llama_fastgen import schema as metadata
from llama_fastgen.converter import convert, gguf_export, reference
from llama_fastgen.converter.architectures import permute_heads
from llama_fastgen.converter.calibration import load_texts, to_token_ids
from llama_fastgen.converter.policies import Full, HeadPolicy, Kind
from llama_fastgen.converter.profiling import profile, select, token_context
from llama_fastgen.converter.tokens import punct_ids, special_ids

PERMS = [[1, 0], [0, 1], [1, 0], [1, 0]]


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(model_dir, n=200):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    name, text = load_texts()[0]
    return to_token_ids(tok, name, text, n)


def test_permutation_preserves_hf_logits(tiny_model_dir):
    ids = _ids(tiny_model_dir)
    m = _load(tiny_model_dir)
    with torch.no_grad():
        before = m(torch.tensor([ids])).logits
        permute_heads(m, PERMS)
        after = m(torch.tensor([ids])).logits
    assert (before - after).abs().max() < 1e-4
    assert not torch.equal(m.model.layers[0].self_attn.k_proj.weight, _load(tiny_model_dir).model.layers[0].self_attn.k_proj.weight)


def test_permuted_gguf_gives_the_same_llama_cpp_logits(tiny_model_dir, tmp_path):
    ids = _ids(tiny_model_dir)
    m = _load(tiny_model_dir)
    permute_heads(m, PERMS)
    permuted = tmp_path / "permuted"
    m.save_pretrained(permuted)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(permuted)
    a = gguf_export.convert_stock(tiny_model_dir, tmp_path / "a.gguf", "f32")
    b = gguf_export.convert_stock(permuted, tmp_path / "b.gguf", "f32")
    la, lb = llama_logits(a, ids), llama_logits(b, ids)
    assert np.abs(la - lb).max() < 1e-4  # measured 1.3e-6 on a tiny GQA Llama (research notes)


@pytest.fixture(scope="module")
def tiny_profiled(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fg") / "tiny-fg.gguf"
    rc = convert.main([str(tiny_model_dir), "--profile", "--outfile", str(out), "--outtype", "f32",
                       "--threshold", "0.6", "--max-tokens", "256"])
    assert rc == 0
    return out


def test_tiny_random_model_fails_the_retrieval_probes_and_says_so(tiny_profiled):
    """A random model answers no needle: nothing is protected and the report says why."""
    rep = json.loads(tiny_profiled.with_suffix(".fastgen.json").read_text())
    assert rep["retrieval"]["protected"] == []
    assert "cannot be measured" in rep["retrieval"]["note"]


def test_metadata_round_trips_and_matches_the_report(tiny_profiled):
    meta = metadata.read(tiny_profiled)
    rep = json.loads(Path(str(tiny_profiled.with_suffix("")) + ".fastgen.json").read_text())
    assert meta.version == metadata.SCHEMA_VERSION and meta.threshold == pytest.approx(0.6)
    assert [c.label for c in meta.classes] == rep["classes"]
    assert meta.head_perm == rep["head_perm"]
    # stored (permuted) order: heads of layer l are the report's policies taken through head_perm
    for l, row in enumerate(meta.head_policies()):
        assert [p.label for p in row] == [rep["policies"][l][h] for h in meta.head_perm[l]]
        assert [p.kind for p in row] == sorted([p.kind for p in row], key=lambda k: (k != Kind.FULL))
    assert len(meta.special_token_ids) >= 1 and len(meta.punct_token_ids) > 10
    assert Path(str(tiny_profiled.with_suffix("")) + ".fastgen.png").stat().st_size > 1000


def test_profiled_gguf_computes_like_the_unpermuted_model(tiny_model_dir, tiny_profiled, tmp_path):
    """With the fastgen cache off (as in stock llama.cpp) the profiled GGUF is just the permuted
    model: same logits as the plain conversion."""
    ids = _ids(tiny_model_dir)
    stock = gguf_export.convert_stock(tiny_model_dir, tmp_path / "stock.gguf", "f32")
    off = llama_logits(tiny_profiled, ids, kv_overrides={"fastgen.enable": False})
    assert np.abs(llama_logits(stock, ids) - off).max() < 1e-4


@pytest.fixture(scope="module")
def real_profile(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [(n, to_token_ids(tok, n, t, 384)) for n, t in load_texts()[:2]]
    res = profile(_load(model_dir), prompts, set(special_ids(tok)), set(punct_ids(tok)), progress=False)
    return res


def test_threshold_one_keeps_every_head_full(real_profile):
    sel = select(real_profile, 1.0, n_head_kv=3)
    assert all(p.kind == Kind.FULL for row in sel.policies for p in row)


def test_lower_thresholds_compress_more(real_profile):
    kinds = {}
    for t in (0.98, 0.9, 0.7):
        sel = select(real_profile, t, n_head_kv=3)
        kinds[t] = sum(p.kind != Kind.FULL for row in sel.policies for p in row)
    assert 0 < kinds[0.9] and kinds[0.98] <= kinds[0.9] <= kinds[0.7]
    # masses are probabilities and each family of rungs is monotone (each rung keeps a superset)
    m = real_profile.mass
    assert m.min() >= 0 and m.max() <= 1 + 1e-5
    rungs = real_profile.rungs
    for family in ([i for i, r in enumerate(rungs) if r.kind != Kind.FREQUENT],
                   [i for i, r in enumerate(rungs) if r.kind in (Kind.FREQUENT, Kind.FULL)]):
        assert len(family) >= 3 and np.all(np.diff(m[..., family], axis=-1) >= -1e-5)


def test_frequent_rungs_are_chosen_by_cost_and_can_be_left_out(real_profile):
    """At 8K a heavy-hitter budget is cheaper than any punct rung (a quarter of the text is
    punctuation), so heads that reach T with it take it; --no-frequent removes those rungs."""
    with_f = select(real_profile, 0.95, n_head_kv=3, n_ctx=8192)
    without = select(real_profile, 0.95, n_head_kv=3, n_ctx=8192, frequent=False)
    kinds = [p.kind for row in with_f.policies for p in row]
    assert Kind.FREQUENT in kinds
    assert Kind.FREQUENT not in [p.kind for row in without.policies for p in row]
    cost = lambda sel: sum(p.cost(8192, real_profile.protected_frac, 4) for row in sel.policies for p in row)
    assert cost(with_f) < cost(without)
    # every head's choice is the cheapest rung whose statistic reaches T
    for l, row in enumerate(with_f.policies):
        for h, p in enumerate(row):
            c = p.cost(8192, real_profile.protected_frac, 4)
            ok = [r for i, r in enumerate(real_profile.rungs) if with_f.stat[l, h, i] >= 0.95 - 1e-6]
            assert all(r.cost(8192, real_profile.protected_frac, 4) >= c for r in ok)


def test_reference_replay_of_a_frequent_head_that_never_evicts_is_plain_attention(model_dir):
    """Budget beyond the text: chunked replay (scores, eviction checks, cache) changes nothing."""
    m = _load(model_dir)
    ids = _ids(model_dir, 200)
    ctx = token_context(ids, set(), set(), 4)
    with torch.no_grad():
        plain = m(torch.tensor([ids])).logits[0]
    hh = [[HeadPolicy(Kind.FREQUENT, 16, 4096)] * 3 for _ in range(30)]
    assert torch.allclose(reference.logits(m, ids, hh, ctx, chunks=32), plain, atol=1e-3)
    with pytest.raises(ValueError, match="chunks"):
        reference.logits(m, ids, hh, ctx)
    small = [[HeadPolicy(Kind.FREQUENT, 16, 48)] * 3 for _ in range(30)]
    q = reference.compare(plain, reference.logits(m, ids, small, ctx, chunks=8), 100)
    assert q["kl_mean"] > 0.01  # a 48-cell budget is a real eviction


def test_reference_with_all_full_equals_plain_hf_exactly(model_dir):
    m = _load(model_dir)
    ids = _ids(model_dir, 128)
    with torch.no_grad():
        plain = m(torch.tensor([ids])).logits[0]
    full = [[HeadPolicy(Kind.FULL)] * 3 for _ in range(30)]
    ctx = token_context(ids, set(), set(), 4)
    assert torch.equal(reference.logits(m, ids, full, ctx), plain)
    assert torch.equal(reference.logits(m, ids, None, None), plain)
    assert Full().keep(ctx).sum() == len(ids) * (len(ids) + 1) // 2


def test_reference_window_policy_hides_old_tokens(model_dir):
    """A 16-token window with no protected tokens must change predictions far from the sinks."""
    m = _load(model_dir)
    ids = _ids(model_dir, 256)
    ctx = token_context(ids, set(), set(), 4)
    pol = [[HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, 16)] * 3 for _ in range(30)]
    q = reference.compare(reference.logits(m, ids, None, None), reference.logits(m, ids, pol, ctx), 128)
    assert q["kl_mean"] > 0.05 and q["top1"] < 0.95
    q0 = reference.compare(reference.logits(m, ids, None, None), reference.logits(m, ids, pol, ctx), 0)
    assert q0["n"] == 256


@pytest.mark.parametrize("case", ["missing", "not_hf", "unsupported", "threshold", "empty_calib", "unwritable",
                                  "kv_budget", "both_rules", "probe_tokens", "policies", "n_sink", "outfile_dir",
                                  "bad_config", "policies_unreadable", "policies_label", "unknown_type", "no_profile"])
def test_bad_input_is_one_clear_error_and_no_output(case, tmp_path, tiny_model_dir, capsys):
    model, out = tiny_model_dir, tmp_path / "out.gguf"
    extra = []
    expect = {"missing": "is not a directory", "not_hf": "no config.json", "unsupported": "not supported",
              "threshold": "--threshold must be in (0, 1]", "empty_calib": "holds no text",
              "unwritable": "does not exist", "kv_budget": "--kv-budget must be a fraction in (0, 1]",
              "both_rules": "--threshold and --kv-budget are two rules for the same choice; give one of them",
              "probe_tokens": "exceeds the model's context of 4096 tokens",
              "policies": "2 layers x 2 heads, the model has 4 x 2 KV heads",
              "n_sink": "--n-sink must be in [0, 65536], got 70000", "outfile_dir": "is a directory; name the GGUF file",
              "bad_config": "config.json is not readable JSON",
              "policies_unreadable": "not a report JSON with a 'policies' table",
              "policies_label": "class special+punct+local0: the window is 0 for full classes",
              "unknown_type": "transformers cannot read", "no_profile": "--kv-budget only apply with --profile"}[case]
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "not_hf":
        model = tmp_path / "plain"
        model.mkdir()
    elif case == "unsupported":
        model = tmp_path / "bloom"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"], "model_type": "bloom"}))
    elif case == "threshold":
        extra = ["--threshold", "1.5"]
    elif case == "empty_calib":
        (tmp_path / "calib").mkdir()
        extra = ["--calibration", str(tmp_path / "calib")]
    elif case == "unwritable":
        out = tmp_path / "no" / "such" / "dir" / "out.gguf"
    elif case == "kv_budget":
        extra = ["--kv-budget", "1.5"]
    elif case == "both_rules":
        extra = ["--kv-budget", "0.3", "--threshold", "0.9"]
    elif case == "probe_tokens":
        extra = ["--probe-tokens", "5000"]
    elif case == "policies":
        (tmp_path / "p.json").write_text(json.dumps({"policies": [["full", "special"], ["full", "full"]]}))
        extra = ["--policies", str(tmp_path / "p.json"), "--max-tokens", "64"]
    elif case == "n_sink":
        extra = ["--n-sink", "70000"]        # would write a GGUF that no loader accepts
    elif case == "outfile_dir":
        out = tmp_path / "a_dir"
        out.mkdir()
    elif case == "bad_config":
        model = tmp_path / "broken"
        model.mkdir()
        (model / "config.json").write_text("{not json")
    elif case == "policies_unreadable":       # refused before the model loads and profiles
        (tmp_path / "p.json").write_text("# not a report")
        extra = ["--policies", str(tmp_path / "p.json")]
    elif case == "policies_label":            # a window of 0: no loader takes it
        (tmp_path / "p.json").write_text(json.dumps({"policies": [["full", "special+punct+local0"]] * 4}))
        extra = ["--policies", str(tmp_path / "p.json")]
    elif case == "unknown_type":
        model = tmp_path / "new"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such"}))
    elif case == "no_profile":                # a stock conversion would drop the rule without a word
        extra = ["--kv-budget", "0.3"]
    profile = [] if case == "no_profile" else ["--profile"]
    rc = convert.main([str(model), *profile, "--outfile", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err and err.count("error:") == 1
    assert (not out.exists() or out.is_dir()) and not list(tmp_path.glob("*.partial"))


def test_default_rule_is_the_kv_budget(tiny_model_dir, tmp_path):
    """No rule given: the converter spends convert.DEFAULT_KV_BUDGET of the full cache at --ctx."""
    out = tmp_path / "d.gguf"
    assert convert.main([str(tiny_model_dir), "--profile", "--outfile", str(out), "--outtype", "f32", "--max-tokens", "128",
                         "--no-retrieval", "--no-quality", "--ctx", "4096"]) == 0
    rep = json.loads(out.with_suffix(".fastgen.json").read_text())
    assert rep["kv_budget"] == convert.DEFAULT_KV_BUDGET and rep["threshold"] is None
    assert metadata.read(out).threshold == 0.0
    assert len({p for row in rep["policies"] for p in row}) > 1       # the budget made choices
    at = next(m for m in rep["expected_kv"] if m["n_ctx"] == 4096)
    assert at["ratio"] <= convert.DEFAULT_KV_BUDGET + 0.01


def test_many_sinks_leave_out_the_frequent_rungs_no_loader_takes():
    """A frequent rung needs a budget beyond n_sink + its window; with 48 sinks budget 64 (window 16) has
    none left, so the ladder never offers it and every rung it offers passes the loader's class check."""
    from llama_fastgen.converter.policies import ladder

    for n_sink, smallest in ((4, 64), (48, 128), (200, 512)):   # budget B keeps window B/4
        rungs = ladder(max_window=4096, n_sink=n_sink)
        assert all(metadata.class_problem(r, n_sink) is None for r in rungs)
        assert min(r.budget for r in rungs if r.kind == metadata.Kind.FREQUENT) == smallest


def test_the_writer_refuses_metadata_the_loader_would_refuse(tiny_model_dir, tmp_path):
    """Read back before the final name: a GGUF whose fastgen keys fail the load never appears."""
    frequent = metadata.HeadPolicy(metadata.Kind.FREQUENT, 16, 64)
    meta = metadata.FastgenMetadata(threshold=0.0, n_sink=48, classes=[frequent], layer_class_heads=[[2]] * 4,
                                    head_perm=[[0, 1]] * 4, special_token_ids=[], punct_token_ids=[], protected_frac=0.0)
    out = tmp_path / "bad.gguf"
    with pytest.raises(gguf_export.ExportError, match="must exceed n_sink \\+ window = 64.*nothing was written"):
        gguf_export.convert(tiny_model_dir, out, "f32", extra_kv=meta.to_kv())
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
