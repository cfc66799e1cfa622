"""scripts/make_random_gguf.py's policy mapping: a real profile's per-head policies stretched over the GPU benchmark's
8B shape, and the two variants that isolate the heavy-hitter heads (frequent heads full) or the mixed layers (full
heads heavy-hitter), checked head by head against the profile (no GPU, no GGUF written)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_random_gguf  # noqa: E402
from llama_fastgen.schema import HeadPolicy, Kind  # noqa: E402

REPORT = json.loads((ROOT / "docs/results/smollm2-T0.95.fastgen.json").read_text())


def _heads(classes, counts):
    return [[c for c, n in zip(classes, row) for _ in range(n)] for row in counts]


def test_mapping_and_both_variants_follow_the_profile_head_by_head():
    src = REPORT["policies"]
    n_layer, n_kv = 32, 8
    base = _heads(*make_random_gguf.policy_from_report(REPORT, n_layer, n_kv))
    no_hh = _heads(*make_random_gguf.policy_from_report(REPORT, n_layer, n_kv, frequent_as_full=True))
    all_hh = _heads(*make_random_gguf.policy_from_report(REPORT, n_layer, n_kv, full_as_frequent=True))
    freq = [HeadPolicy.from_label(x) for row in src for x in row if HeadPolicy.from_label(x).kind == Kind.FREQUENT]
    common = max(set(freq), key=freq.count)
    assert common == HeadPolicy.from_label("special+frequent512+local128")
    for l in range(n_layer):
        ls = round(l * (len(src) - 1) / (n_layer - 1))
        want = sorted((HeadPolicy.from_label(src[ls][h % len(src[0])]) for h in range(n_kv)), key=str)
        assert sorted(base[l], key=str) == want
        # per layer the heads are grouped by class, so compare as multisets
        assert sorted(no_hh[l], key=str) == sorted((HeadPolicy(Kind.FULL) if c.kind == Kind.FREQUENT else c for c in want), key=str)
        assert sorted(all_hh[l], key=str) == sorted((common if c.kind == Kind.FULL else c for c in want), key=str)
    assert any(c.kind == Kind.FULL for row in base for c in row)          # the profile has full heads to replace
    assert not any(c.kind == Kind.FULL for row in all_hh for c in row)
    assert not any(c.kind == Kind.FREQUENT for row in no_hh for c in row)
