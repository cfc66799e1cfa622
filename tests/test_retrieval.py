"""Retrieval protection: the probes are reproducible, the heads they rank first carry retrieval
(Wu et al.'s causal test: compressing them loses needles, compressing as many random heads does
not), budgets are respected, and protected heads are full in the written GGUF and natively."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llama_fastgen import schema
from llama_fastgen.converter import calibration, convert, protect, tokens
from llama_fastgen.converter.probes import copy_paste, induction, tasks
from llama_fastgen.converter.profiling import allocate, profile, token_context
from llama_fastgen.schema import HeadPolicy, Kind

N_KV = 3  # SmolLM2: 3 KV heads of 3 query heads


@pytest.fixture(scope="module")
def smol(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok, set(tokens.special_ids(tok)), set(tokens.punct_ids(tok))


@pytest.fixture(scope="module")
def haystack():
    return "\n\n".join(t for _, t in calibration.load_texts())


@pytest.fixture(scope="module")
def probe_scores(smol, haystack):
    model, tok, special, _ = smol
    return protect.probe_scores(model, tok, special, haystack, N_KV, n_tokens=768, n_prompts=4)


def test_probe_scores_are_reproducible(smol, haystack, probe_scores):
    model, tok, special, _ = smol
    ind = induction.scores(model, tok, special)
    np.testing.assert_array_equal(protect.group_max(ind["induction"], N_KV), probe_scores[0]["induction"])
    np.testing.assert_array_equal(protect.group_max(ind["echo"], N_KV), probe_scores[0]["echo"])
    prompts = [tasks.needle(tok, 768, float(d), s, haystack) for s, d in enumerate(np.linspace(0.05, 0.95, 4))]
    copy, ok = copy_paste.scores(model, prompts)
    np.testing.assert_array_equal(protect.group_max(copy, N_KV), probe_scores[0]["copy"])
    assert ok == probe_scores[1] and all(ok)   # the full model answers its probes
    for s in probe_scores[0].values():          # probabilities / shares, and a few heads stand out
        assert s.min() >= 0 and s.max() <= 1 + 1e-6 and s.max() > 0.3


def test_top_ranked_heads_carry_retrieval_and_random_heads_do_not(smol, haystack, probe_scores):
    """Compressing the 8 top-ranked KV heads to sinks + a 16-token window loses most held-aside
    needles; compressing 8 random other heads (three draws) keeps the full model's answers."""
    model, tok, special, punct = smol
    ranking, _ = protect.rank(probe_scores[0])
    val = protect.validation_prompts(tok, haystack, 1024, n=4)
    mk = lambda ids: token_context(ids, special, punct, 4)
    window = HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, 16)
    full = [[protect.FULL] * N_KV for _ in range(model.config.num_hidden_layers)]

    def compress(heads):
        pol = [list(r) for r in full]
        for l, h in heads:
            pol[l][h] = window
        return protect.answered(model, val, pol, mk, 64)[0]

    n_full = protect.answered(model, val, None, mk, 64)[0]
    assert n_full >= 3
    assert compress(ranking[:8]) <= n_full // 2
    rng = random.Random(0)
    for _ in range(3):
        assert compress(rng.sample(ranking[8:], 8)) >= n_full - 1


def test_allocation_meets_the_budget_and_keeps_fixed_heads(model_dir, smol):
    model, tok, special, punct = smol
    prompts = [(n, calibration.to_token_ids(tok, n, t, 384)) for n, t in calibration.load_texts()[:2]]
    res = profile(model, prompts, special, punct, progress=False)
    assert res.damage.shape[:3] == (2, model.config.num_hidden_layers, N_KV)
    full = next(i for i, r in enumerate(res.rungs) if r.kind == Kind.FULL)
    assert np.abs(res.damage[..., full]).max() < 1e-6            # the full rung changes nothing
    cost = lambda pol: sum(p.cost(8192, res.protected_frac, 4) for row in pol for p in row) / (8192 * 90)
    fixed = {(17, 1): protect.FULL, (18, 2): protect.FULL}
    total = {}
    for b in (0.15, 0.3, 0.6):
        pol = allocate(res, b, N_KV, fixed=fixed)
        assert cost(pol) <= b + 1e-9
        assert all(pol[l][h] == protect.FULL for l, h in fixed)
        total[b] = sum(res.damage.mean(0)[l, h, res.rungs.index(p)] for l, row in enumerate(pol) for h, p in enumerate(row))
    assert total[0.6] <= total[0.3] <= total[0.15]
    with pytest.raises(protect.BudgetTooSmall, match="over the"):
        allocate(res, 0.01, N_KV, fixed=fixed)


@pytest.fixture(scope="module")
def protected_gguf(model_dir, tmp_path_factory):
    """SmolLM2 profiled with retrieval protection; small sizes to stay quick, and T = 0.8 so that the
    profile loses held-aside needles until retrieval heads are protected."""
    out = tmp_path_factory.mktemp("prot") / "smollm2-prot.gguf"
    assert convert.main([str(model_dir), "--profile", "--outfile", str(out), "--outtype", "f32", "--threshold", "0.8",
                         "--max-tokens", "384", "--probe-tokens", "1024", "--no-quality"]) == 0
    return out


def test_protected_heads_are_full_in_the_gguf_and_natively_equal_the_reference(protected_gguf, model_dir, long_ids):
    from test_native import _agrees, _reference

    from llama_fastgen.logits import teacher_forced

    rep = json.loads(protected_gguf.with_suffix(".fastgen.json").read_text())
    rt = rep["retrieval"]
    assert rt["protected"] and rt["answered"] == rt["full_answered"] and not rt["note"]
    meta = schema.read(protected_gguf)
    assert meta.calibration["retrieval_protected"] == len(rt["protected"])
    pol = meta.original_head_policies()
    assert all(pol[l][h].kind == Kind.FULL for l, h in rt["protected"])
    assert [[p.label for p in row] for row in pol] == rep["policies"]
    start = 1 + max(max(c.window, c.budget) for c in meta.classes) + 64
    nat, _ = teacher_forced(protected_gguf, long_ids, n_ctx=2048, n_batch=64)
    ref, full = _reference(model_dir, protected_gguf, long_ids, 64, 2048)
    _agrees(nat[start:], ref[start:], full[start:])


def test_needle_prompts_place_the_fact_and_ask_for_it(model_dir):
    """The needle sits at its depth inside the document, holds the key's tokens, and the prompt ends
    where the key must follow; the three-turn variant puts an unrelated exchange in between."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hay = "Plain sentences about nothing in particular. " * 200
    spans = []
    for depth in (0.1, 0.5, 0.9):
        p = tasks.needle(tok, 1000, depth, 3, hay)
        assert abs(len(p.ids) - 1000) <= 8
        needle_text = tok.decode(p.ids[p.span[0]:p.span[1]])
        assert p.key in needle_text and tok.decode(p.answer).strip() == p.key
        assert tok.decode(p.ids[-12:]).rstrip().endswith("is")
        spans.append(p.span[0])
    assert spans == sorted(spans) and spans[0] < 300 < spans[1] < 700 < spans[2]
    multi = tasks.needle(tok, 1000, 0.5, 3, hay, turns=3)
    tail = tok.decode(multi.ids[multi.span[1]:])
    assert "describe the sea" in tail and tail.index("describe the sea") < tail.index("Question:")
    with pytest.raises(ValueError, match="turns must be 1 or 3"):
        tasks.needle(tok, 500, 0.5, 0, hay, turns=2)


def test_multi_key_and_variable_tracking_prompts_hold_one_right_answer(model_dir):
    """Multi-key: the asked needle plus distractors of other names and keys, at other depths.
    Variable tracking: the value assigned once, then passed through a chain of variables in order,
    and the question asks for the last one."""
    import re

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hay = "Plain sentences about nothing in particular. " * 200
    for depth in (0.05, 0.5, 0.95):
        p = tasks.needle(tok, 1000, depth, 5, hay, distractors=3)
        text = tok.decode(p.ids)
        facts = re.findall(r"The secret number of ([\w ]+?) is (\d+)\.", text)
        assert abs(len(p.ids) - 1000) <= 12 and len(facts) == 4
        assert len({n for n, _ in facts}) == 4 and len({k for _, k in facts}) == 4
        asked = re.search(r"What is the secret number of ([\w ]+?)\?", text).group(1)
        assert dict(facts)[asked] == p.key and p.key in tok.decode(p.ids[p.span[0]:p.span[1]])
        v = tasks.needle(tok, 1000, depth, 5, hay, hops=3)
        text = tok.decode(v.ids)
        chain = re.findall(r"VAR (X\d+) = (?:VAR (X\d+)|(\d+))\.", text)
        assert len(chain) == 4 and chain[0][2] == v.key
        assert all(chain[i][1] == chain[i - 1][0] for i in range(1, 4))   # each hop after the one it copies
        assert text.rstrip().endswith(f"The value of VAR {chain[-1][0]} is")


def test_policy_labels_parse_back():
    from llama_fastgen.converter.policies import ladder

    for p in ladder(max_window=4096):
        assert HeadPolicy.from_label(p.label) == p
    with pytest.raises(schema.MetadataError, match="unknown policy label"):
        HeadPolicy.from_label("special+local64")
