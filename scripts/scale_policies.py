#!/usr/bin/env python3
"""Scale the windows and heavy-hitter budgets of a profile's policy table by a factor: what a cache
whose budgets grow with the context would hold at FACTOR times the context the profile was sized
for (issue 12 item 4, measured with `scripts/eval.py --fastgen-args "--policies OUT"`).

    python scripts/scale_policies.py docs/results/smollm2-B0.30.fastgen.json 2 OUT.fastgen.json

Full heads stay full; the rest of the report is copied unchanged."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from llama_fastgen.schema import HeadPolicy, Kind


def scaled(label: str, factor: float) -> str:
    p = HeadPolicy.from_label(label)
    if p.kind in (Kind.FREQUENT, Kind.SPECIAL_PUNCT_LOCAL):
        p = replace(p, window=round(p.window * factor), budget=round(p.budget * factor))
    return p.label


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a converter report (OUT.fastgen.json)")
    ap.add_argument("factor", type=float, help="scale of windows and budgets, e.g. 2")
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    rep = json.loads(a.report.read_text())
    rep["policies"] = [[scaled(label, a.factor) for label in row] for row in rep["policies"]]
    rep["scaled_from"] = {"report": str(a.report), "factor": a.factor}
    a.out.write_text(json.dumps(rep))
    print("wrote", a.out, sorted({label for row in rep["policies"] for label in row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
