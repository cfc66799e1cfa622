#!/usr/bin/env python3
"""Where a decode step's GPU time goes, from scripts/gpu_timeline.cpp's kernel timeline (CUPTI; the GPU machine has no nsys).

    python3 scripts/gpu_timeline.py fastgen.txt [full.txt ...] [--last N]

A step is a run of kernels with no gap over --gap µs (decode steps are separated by the host's sampling). Only the
last N steps count (llama-bench's generation after its depth and warm-up). Per file: the step's wall time, how
much of it no kernel runs (launch and dependency latency), how much runs two or more kernels at once, and per
kernel: launches and µs per step (medians over the steps). Several files: one column each, so a fastgen run sits
beside the full cache's.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys


def short(name: str) -> str:
    base = name.split("(")[0]
    depth, out = 0, []
    for ch in base:  # drop template arguments
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    s = "".join(out).replace("void ", "").strip()
    return re.sub(r"^.*::", "", s) or base


def read(path: str):
    ks = []
    for ln in open(path):
        p = ln.rstrip("\n").split(" ", 7)
        if len(p) == 8:
            ks.append((int(p[0]), int(p[1]), int(p[2]), short(p[7])))
    ks.sort()
    return ks


def steps(ks, gap_ns: int):
    out, cur, end = [], [], 0
    for k in ks:
        if cur and k[0] - end > gap_ns:
            out.append(cur)
            cur = []
        cur.append(k)
        end = max(end, k[1]) if len(cur) > 1 else k[1]
    if cur:
        out.append(cur)
    return out


def step_stats(st):
    t0, t1 = st[0][0], max(k[1] for k in st)
    ev = sorted([(k[0], 1) for k in st] + [(k[1], -1) for k in st])
    busy = multi = 0
    n, last = 0, t0
    for t, d in ev:
        if n >= 1:
            busy += t - last
        if n >= 2:
            multi += t - last
        n += d
        last = t
    per = {}
    for k in st:
        c, s = per.get(k[3], (0, 0))
        per[k[3]] = (c + 1, s + k[1] - k[0])
    return {"wall": (t1 - t0) / 1e3, "idle": (t1 - t0 - busy) / 1e3, "overlap": multi / 1e3, "per": per,
            "streams": len({k[2] for k in st})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--gap", type=float, default=20.0, help="µs without a kernel that ends a step (default 20)")
    ap.add_argument("--last", type=int, default=8, help="steps counted, from the end (default 8)")
    a = ap.parse_args()
    cols = []
    for f in a.files:
        sts = [s for s in steps(read(f), int(a.gap * 1e3)) if len(s) > 50][-a.last:]
        if not sts:
            print(f"{f}: no steps", file=sys.stderr)
            return 1
        cols.append((f, [step_stats(s) for s in sts]))
    med = statistics.median
    print("| per decode step (median µs) | " + " | ".join(f.split("/")[-1] for f, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key in ("wall", "idle", "overlap", "streams"):
        print(f"| {key} | " + " | ".join(f"{med(s[key] for s in ss):.1f}" for _, ss in cols) + " |")
    names = sorted({n for _, ss in cols for s in ss for n in s["per"]},
                   key=lambda n: -max(med(s["per"].get(n, (0, 0))[1] for s in ss) for _, ss in cols))
    for n in names:
        cells = []
        for _, ss in cols:
            c = med(s["per"].get(n, (0, 0))[0] for s in ss)
            t = med(s["per"].get(n, (0, 0))[1] for s in ss) / 1e3
            cells.append(f"{t:.1f} ({c:g})" if c else "-")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"({len(cols[0][1])} steps each; kernel rows: µs summed over the step's launches (launches); overlapping kernels both count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
