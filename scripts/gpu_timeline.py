#!/usr/bin/env python3
"""Where a decode step's GPU time goes, kernel by kernel, from a CUPTI timeline (scripts/gpu_timeline.cpp; the GPU
machine has ncu, which times each kernel alone, but no nsys).

    python3 scripts/gpu_timeline.py run --llama-bench BIN --preload gpu_timeline.so --model M.gguf [--model-nohh M2]
            --depths 0 512 --configs 'fastgen f16' 'full f16' ... [--keep DIR] --json F
    python3 scripts/gpu_timeline.py files A.txt [B.txt ...]      # timelines recorded by hand
    python3 scripts/gpu_timeline.py --from-json F                # the tables of a results file

Per layer (llama's layout: two rope kernels, Q and K, before a layer's attention) the µs from the second rope's end
to the attention's end and to the output projection's end, by kind: full (flash attention), hh (the heavy-hitter
op alone), mixed (both, on two streams).

run: one llama-bench generation (-p 0 -n --tokens -d DEPTH -r 1) per config (bench_gpu.py's speed configs) and
depth under the preloaded tracer. A step is a run of kernels with no gap over --gap µs (decode steps are separated
by the host's sampling); the last --last steps count. Per config: the step's wall time (median [min-max]), how much
of it no kernel runs (launch and dependency latency), how much runs two or more kernels at once, and per kernel
name its launches and µs per step (medians over the steps; overlapping kernels both count). A token's period (step
start to the next step's start) and the part of it between steps: the host's time, which llama-bench's tokens/s
counts and a step's wall time does not; and per token, each CUDA runtime call's count and the host µs spent inside
it, and each kind of copy's count and bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile


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


COPY_KINDS = {1: "HtoD", 2: "DtoH", 8: "DtoD", 10: "PtoP"}  # CUPTI_ACTIVITY_MEMCPY_KIND_*


def read_all(path: str):
    """one pass over a tracer file: kernels (start, end, stream, short name), sorted; CUDA runtime calls (start, end,
    name); copies (start, end, bytes, kind)"""
    ks, api, cp = [], [], []
    for ln in open(path):
        p = ln.rstrip("\n").split(" ", 7)
        if p[0] == "api" and len(p) == 5:
            api.append((int(p[1]), int(p[2]), p[4]))
        elif p[0] == "memcpy" and len(p) == 7:
            cp.append((int(p[1]), int(p[2]), int(p[4]), COPY_KINDS.get(int(p[5]), p[5])))
        elif len(p) == 8:
            ks.append((int(p[0]), int(p[1]), int(p[2]), short(p[7])))
    ks.sort()
    return ks, api, cp


def host_per_token(sts, api, cp) -> dict:
    """per token over the counted steps (from the first one's start to the last one's): each runtime call's count and
    the host µs spent inside it, and each copy kind's count and bytes; calls and copies count by their start (a graph
    launch may still run on the host when its step starts on the GPU). The tracer's own cost per call is in these
    figures (CUPTI records every runtime call), so they read somewhat above an untraced run's."""
    if len(sts) < 2:
        return {}
    t0, t1, n = sts[0][0][0], sts[-1][0][0], len(sts) - 1
    calls, copies = {}, {}
    for a, b, name in api:
        if t0 <= a < t1:
            c, us = calls.get(name, (0, 0.0))
            calls[name] = (c + 1, us + (b - a) / 1e3)
    for a, b, nbytes, kind in cp:
        if t0 <= a < t1:
            c, by = copies.get(kind, (0, 0))
            copies[kind] = (c + 1, by + nbytes)
    return {"calls": {k: {"per_token": c / n, "us": us / n} for k, (c, us) in calls.items()},
            "copies": {k: {"per_token": c / n, "bytes": by / n} for k, (c, by) in copies.items()}}


def host_table(cols) -> str:
    """cols: (title, summary) per column; the runtime calls and copies per token (summaries from session 40 on)"""
    cols = [(t, c.get("host") or {}) for t, c in cols]
    names = sorted({n for _, h in cols for n in h.get("calls", {})}, key=lambda n: -max(h.get("calls", {}).get(n, {"us": 0})["us"] for _, h in cols))
    if not names:
        return ""
    lines = ["| per token: host µs inside the call (calls) | " + " | ".join(t for t, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| every runtime call | " + " | ".join(f"{sum(x['us'] for x in h.get('calls', {}).values()):.1f}" for _, h in cols) + " |")
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{h['calls'][n]['us']:.1f} ({h['calls'][n]['per_token']:g})" if n in h.get("calls", {}) else "-" for _, h in cols) + " |")
    for kind in sorted({k for _, h in cols for k in h.get("copies", {})}):
        lines.append(f"| copies {kind}: count, bytes | " + " | ".join(
            f"{h['copies'][kind]['per_token']:g}, {h['copies'][kind]['bytes']:.0f}" if kind in h.get("copies", {}) else "-" for _, h in cols) + " |")
    return "\n".join(lines)


def tables(cols) -> str:
    h = host_table(cols)
    return table(cols) + ("\n\n" + h if h else "")


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


ATTN = ("hh_attn", "flash_attn_ext_vec", "flash_attn_ext_f16", "flash_attn_combine_results", "concat_cont")


def layer_times(st) -> list:
    """per layer of a llama-style step (two rope kernels, Q and K, before its attention): its kind (full: flash
    attention only; hh: the heavy-hitter op only; mixed: both), the µs from its second rope's end to its attention's
    last kernel's end, and to the end of the output projection's matrix-vector kernel after it"""
    ropes = [i for i, k in enumerate(st) if k[3] == "rope_norm"]
    out = []
    for a in range(1, len(ropes), 2):
        t_r = st[ropes[a]][1]
        seg = st[ropes[a] + 1:ropes[a + 1] if a + 1 < len(ropes) else len(st)]
        names = {k[3] for k in seg}
        att = [k for k in seg if k[3] in ATTN]
        if not att:
            continue
        att_end = max(k[1] for k in att)
        mm = [k for k in seg if k[3] == "mul_mat_vec_q" and k[1] > att_end]
        kind = "mixed" if "hh_attn" in names and len(names & set(ATTN[1:3])) else "hh" if "hh_attn" in names else "full"
        out.append((kind, (att_end - t_r) / 1e3, (mm[0][1] - t_r) / 1e3 if mm else None))
    return out


def summarize(sts) -> dict:
    med = statistics.median
    ss = [step_stats(s) for s in sts]
    lay = {}
    for st in sts:
        for kind, att, outp in layer_times(st):
            lay.setdefault(kind, []).append((att, outp))
    walls = [s["wall"] for s in ss]
    names = {n for s in ss for n in s["per"]}
    # a token's whole period, and the part of it no step runs: the host's work between steps (graph update, sampling,
    # the cache's bookkeeping), which the step's wall time leaves out and llama-bench's tokens/s counts
    pairs = list(zip(sts, sts[1:]))
    period = [(b[0][0] - a[0][0]) / 1e3 for a, b in pairs]
    between = [(b[0][0] - max(k[1] for k in a)) / 1e3 for a, b in pairs]
    return {"steps": len(ss), "wall_us": med(walls), "wall_min": min(walls), "wall_max": max(walls),
            "period_us": med(period) if period else None, "between_us": med(between) if between else None,
            "period_min": min(period) if period else None, "period_max": max(period) if period else None,
            "idle_us": med(s["idle"] for s in ss), "overlap_us": med(s["overlap"] for s in ss),
            "streams": med(s["streams"] for s in ss),
            "layers": {k: {"per_step": len(v) / len(ss), "attention_us": med(x[0] for x in v),
                           "to_out_proj_us": med(x[1] for x in v if x[1] is not None) if any(x[1] for x in v) else None}
                       for k, v in lay.items()},
            "kernels": {n: {"launches": med(s["per"].get(n, (0, 0))[0] for s in ss),
                            "us": med(s["per"].get(n, (0, 0))[1] for s in ss) / 1e3} for n in names}}


def table(cols) -> str:
    """cols: (title, summary) per column"""
    lines = ["| per decode step (µs, median over the steps) | " + " | ".join(t for t, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|",
             "| wall [min-max] | " + " | ".join(f"{c['wall_us']:.1f} [{c['wall_min']:.0f}-{c['wall_max']:.0f}]" for _, c in cols) + " |"]
    if any(c.get("period_us") is not None for _, c in cols):  # files written before session 40 have neither
        # [min-max]: a wide spread says a token's kernels were not one step (a gap over --gap, or a short step left out)
        lines.append("| a token: step start to the next step's start [min-max] / of it between steps | " + " | ".join(
            f"{c['period_us']:.1f} [{c['period_min']:.0f}-{c['period_max']:.0f}] / {c['between_us']:.1f}"
            if c.get("period_us") is not None else "-" for _, c in cols) + " |")
    for key, label in (("idle_us", "no kernel running"), ("overlap_us", "two or more kernels running"), ("streams", "streams")):
        lines.append(f"| {label} | " + " | ".join(f"{c[key]:.1f}" if key != "streams" else f"{c[key]:g}" for _, c in cols) + " |")
    for kind in ("full", "hh", "mixed"):
        if any(kind in c.get("layers", {}) for _, c in cols):
            cells = []
            for _, c in cols:
                L = c.get("layers", {}).get(kind)
                cells.append(f"{L['attention_us']:.2f} / {L['to_out_proj_us']:.2f} ({L['per_step']:g})" if L and L["to_out_proj_us"] else "-")
            lines.append(f"| {kind} layer: rope end to attention end / to output projection end (layers) | " + " | ".join(cells) + " |")
    names = sorted({n for _, c in cols for n in c["kernels"]}, key=lambda n: -max(c["kernels"].get(n, {"us": 0})["us"] for _, c in cols))
    for n in names:
        cells = []
        for _, c in cols:
            k = c["kernels"].get(n)
            cells.append(f"{k['us']:.1f} ({k['launches']:g})" if k and k["launches"] else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(f"(kernel rows: µs per step summed over the launches (launches per step); {cols[0][1]['steps']} steps per column)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["run", "files"])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--from-json", type=argparse.FileType(), help="print the tables of a results file")
    ap.add_argument("--llama-bench")
    ap.add_argument("--preload", help="gpu_timeline.so (built from scripts/gpu_timeline.cpp)")
    ap.add_argument("--model")
    ap.add_argument("--model-nohh", help="for the config 'fastgen hh->full'")
    ap.add_argument("--configs", nargs="+", default=["fastgen f16", "full f16"])
    ap.add_argument("--depths", nargs="+", type=int, default=[0, 512])
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per run (default 32)")
    ap.add_argument("--gap", type=float, default=20.0, help="µs without a kernel that ends a step (default 20)")
    ap.add_argument("--last", type=int, default=16, help="steps counted, from the end (default 16)")
    ap.add_argument("--keep", help="keep the raw timelines in this folder")
    ap.add_argument("--json")
    ap.add_argument("--recorded-on", default="", help="files: the machine and build the timelines were recorded on")
    a = ap.parse_args()
    if a.from_json:
        res = json.load(a.from_json)
        for d in sorted({r["depth"] for r in res["rows"]}):
            print(f"depth {d}\n" + tables([(r["config"], r) for r in res["rows"] if r["depth"] == d]) + "\n")
        return 0

    def count(path):
        ks, api, cp = read_all(path)
        sts = [s for s in steps(ks, int(a.gap * 1e3)) if len(s) > 50][-a.last:]
        if not sts:
            raise SystemExit(f"gpu_timeline.py: no decode steps in {path}")
        return {**summarize(sts), "host": host_per_token(sts, api, cp)}

    if a.what == "files":
        cols = [(f.split("/")[-1], count(f)) for f in a.files]
        print(tables(cols))
        if a.json:  # timelines recorded elsewhere: --recorded-on names the machine, the file records this analysis
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_gpu import run_info  # beside this script
            res = {**run_info(), "recorded_on": a.recorded_on, "rows": [{"config": t, "depth": 0, **c} for t, c in cols]}
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if a.what != "run" or not (a.llama_bench and a.preload and a.model):
        ap.error("run needs --llama-bench, --preload and --model (or: files A.txt ..., or --from-json F)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu import bench, run_info, speed_configs  # beside this script

    res = run_info()
    res["tokens"], res["rows"] = a.tokens, []
    keep = a.keep or tempfile.mkdtemp()
    os.makedirs(keep, exist_ok=True)
    for d in a.depths:
        for name, model, extra, env in speed_configs(a):
            path = os.path.join(keep, f"{name.replace(' ', '_').replace('>', '')}-d{d}.txt")
            # bench_gpu.py's llama-bench run (its flags), one repetition under the tracer
            bench(a.llama_bench, model, ["-p", "0", "-n", str(a.tokens), "-d", str(d)] + extra,
                  {**env, "GPU_TIMELINE_OUT": path, "LD_PRELOAD": a.preload}, 1)
            res["rows"].append({"config": name, "depth": d, **count(path)})
            print(f"  {name} @ d{d}: {res['rows'][-1]['wall_us']:.1f} µs a step", flush=True)
        print(f"depth {d}\n" + tables([(r["config"], r) for r in res["rows"] if r["depth"] == d]) + "\n", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
