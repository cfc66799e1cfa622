#!/usr/bin/env python3
"""Where GPU time goes: every kernel of a few llama-bench decode steps (or of one prompt with
--prompt N) under Nsight Compute (one metric, gpu__time_duration), summed per kernel name, for
fastgen and the full cache. Run on the GPU machine after scripts/gpu_run.sh has built llama-bench:

    python scripts/gpu_profile.py --llama-bench BIN --model M.gguf [--depth 0] [--tokens 8] [--prompt 0] [--json F]

--stalls --kernels REGEX [--launch-skip K] [--launch-count N] [--prompt N]: why the matching launches take their time
instead (Nsight Compute's full set, clocks left alone): duration, instructions, registers, grid and the
stall reasons per issued instruction of each launch. Session 19 ran the same ncu commands from a call
script on `hh_attn` (docs/RESULTS.md); this mode, which packs them, has not run on the GPU yet.

--kernels REGEX --launch-count N profiles only the first N launches of the kernels whose names match
(a long prompt's attention kernels in seconds, not the whole graph); the table then also gives the
time per launch.

--from-json F [--tokens N]: the markdown table of a results file for docs/RESULTS.md (per decode token
when N is given: the file's decode tokens).

--from-ncu-csv FASTGEN.csv FULL.csv --ncu-command CMD --measured MACHINE COMMIT WHEN --tokens N --json F: the
results file from two saved outputs of the ncu command above (a call script ran it by hand), recording which, and
the machine, commit and time of the measurement instead of this conversion's.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections import defaultdict


def profile(bench: str, model: str, depth: int, tokens: int, env_extra: dict, prompt: int = 0,
            kernels: str | None = None, launch_count: int = 0) -> dict:
    only = (["--kernel-name", f"regex:{kernels}"] if kernels else []) + (["--launch-count", str(launch_count)] if launch_count else [])
    cmd = ["ncu", "--csv", "--metrics", "gpu__time_duration.sum", "--graph-profiling", "node", *only,
           bench, "-m", model, "-ngl", "99", "-fa", "1", "-p", str(prompt), "-n", str(tokens), "-d", str(depth), "-r", "1",
           "--no-warmup"]
    out = subprocess.run(cmd, env=dict(os.environ, **env_extra), capture_output=True, text=True).stdout
    return parse(out)


def parse(out: str) -> dict:
    """ncu --csv --metrics gpu__time_duration.sum output: time and launches per kernel name"""
    rows = list(csv.DictReader(io.StringIO(out[out.index('"ID"'):])))
    per, launches = defaultdict(float), defaultdict(int)
    for r in rows:
        name = re.sub(r"[<(].*", "", r["Kernel Name"])
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
        per[name] += float(r["Metric Value"].replace(",", "")) * scale  # -> us
        launches[name] += 1
    return {"kernels": len(rows), "us_by_kernel": dict(per), "launches_by_kernel": dict(launches)}


STALL_KEYS = ("gpu__time_duration.sum", "smsp__inst_executed.sum", "launch__registers_per_thread", "launch__grid_dim_x",
              "launch__grid_dim_y", "launch__grid_dim_z",
              # achieved occupancy, tensor-pipe and SM busy shares (%): latency-bound or throughput-bound
              "sm__warps_active.avg.pct_of_peak_sustained_active",
              "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
              "sm__throughput.avg.pct_of_peak_sustained_elapsed", "launch__occupancy_limit_registers",
              "launch__occupancy_limit_shared_mem")
SHARES = {"sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy",
          "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe",
          "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM throughput"}


def stalls(bench: str, model: str, depth: int, tokens: int, env_extra: dict, kernels: str, skip: int, count: int,
           prompt: int = 0) -> list[dict]:
    """Per matching launch: STALL_KEYS and every smsp__average_warps_issue_stalled_*_per_issue_active.ratio."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, "stalls")
        subprocess.run(["ncu", "--clock-control", "none", "--set", "full", "--kernel-name", f"regex:{kernels}",
                        "--launch-skip", str(skip), "--launch-count", str(count), "-f", "-o", rep,
                        bench, "-m", model, "-ngl", "99", "-fa", "1", "-p", str(prompt), "-n", str(tokens), "-d", str(depth),
                        "-r", "1", "--no-warmup"], env=dict(os.environ, **env_extra), capture_output=True, text=True)
        if not os.path.exists(rep + ".ncu-rep"):
            return []   # no launch matched (e.g. the full cache runs no hh_attn)
        out = subprocess.run(["ncu", "--import", rep + ".ncu-rep", "--page", "raw", "--csv"], capture_output=True, text=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    i = next((k for k, r in enumerate(rows) if r and r[0] == "ID"), None)
    if i is None:
        return []
    hdr, units, data = rows[i], rows[i + 1], rows[i + 2:]

    def num(v: str):
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return v
    keep = [j for j, h in enumerate(hdr) if h in STALL_KEYS or
            (h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio"))]
    name = hdr.index("Kernel Name") if "Kernel Name" in hdr else None
    short = {j: hdr[j].replace("smsp__average_warps_issue_stalled_", "stall_").replace("_per_issue_active.ratio", "") for j in keep}
    return [{"kernel": r[name] if name is not None else "", "units": {short[j]: units[j] for j in keep},
             **{short[j]: num(r[j]) for j in keep}} for r in data if len(r) == len(hdr)]


def print_stalls(res: dict) -> None:
    for name in ("fastgen", "full"):
        for n, launch in enumerate(res[name]):
            top = sorted(((v, k) for k, v in launch.items() if k.startswith("stall_") and isinstance(v, float)), reverse=True)[:5]
            print(f"  {name} launch {n}: {launch['kernel'][:40]} {launch.get('gpu__time_duration.sum')} "
                  f"{launch['units'].get('gpu__time_duration.sum', '')}, "
                  f"{launch.get('smsp__inst_executed.sum')} warp instructions, {launch.get('launch__registers_per_thread')} "
                  "registers, grid " + "x".join(str(launch.get(f"launch__grid_dim_{d}")) for d in "xyz") + "; "
                  + ", ".join(f"{v} {launch.get(k)}%" for k, v in SHARES.items() if k in launch)
                  + "; stall cycles per instruction: " + ", ".join(f"{k[6:]} {v:.2f}" for v, k in top))


def stalls_markdown(res: dict, top: int = 6) -> str:
    """--stalls results: per launch its time, instructions and the largest stall reasons (cycles per instruction)."""
    launches = [(n, i, x) for n in ("fastgen", "full") for i, x in enumerate(res.get(n) or [])]
    reasons = sorted({k for _, _, x in launches for k in x if k.startswith("stall_")},
                     key=lambda k: -max(x.get(k, 0) for _, _, x in launches))[:top]
    out = ["| launch | µs | warp instructions | " + " | ".join(k[6:] for k in reasons) + " |",
           "|---|---|---|" + "---|" * len(reasons)]
    for n, i, x in launches:
        out.append(f"| {n} {i}: `{x['kernel'].split('(')[0].replace('void ', '')}` | {x['gpu__time_duration.sum']:.1f} | "
                   f"{x['smsp__inst_executed.sum']:,.0f} | " + " | ".join(f"{x.get(k, 0):.2f}" for k in reasons) + " |")
    return "\n".join(out)


def markdown(res: dict, tokens: int = 0) -> str:
    """Kernel time by name, fastgen against the full cache: per launch, and in all (per decode token with tokens)."""
    if isinstance(res.get("fastgen"), list):  # a --stalls run
        return stalls_markdown(res)
    runs = {n: res[n] for n in ("fastgen", "full")}
    names = sorted(set().union(*(r["us_by_kernel"] for r in runs.values())),
                   key=lambda k: -max(r["us_by_kernel"].get(k, 0) for r in runs.values()))
    per = "per decode token" if tokens else "in all"
    out = [f"| kernel | fastgen, µs {per} (launches) | full cache, µs {per} (launches) | fastgen, µs per launch | full cache, µs per launch |",
           "|---|---|---|---|---|"]
    div = tokens or 1

    def cell(r, k, per_launch=False):
        if k not in r["us_by_kernel"]:
            return "-"
        n = r["launches_by_kernel"][k]
        return f"{r['us_by_kernel'][k] / n:.1f}" if per_launch else f"{r['us_by_kernel'][k] / div:.1f} ({n / div:g})"
    for k in names:
        out.append(f"| `{k.replace('void ', '')}` | " + " | ".join(cell(r, k) for r in runs.values()) + " | "
                   + " | ".join(cell(r, k, True) for r in runs.values()) + " |")
    tot = {n: sum(r["us_by_kernel"].values()) / div for n, r in runs.items()}
    out.append(f"| all | {tot['fastgen']:.1f} | {tot['full']:.1f} | | |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", type=argparse.FileType(), help="print the markdown table of a results file")
    ap.add_argument("--llama-bench")
    ap.add_argument("--model")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=0, help="profile a prompt of N tokens (prefill) instead")
    ap.add_argument("--kernels", help="only kernels whose names match this regex")
    ap.add_argument("--launch-count", type=int, default=0, help="only the first N matching launches")
    ap.add_argument("--launch-skip", type=int, default=0, help="--stalls: skip the first K matching launches")
    ap.add_argument("--stalls", action="store_true", help="stall reasons of the --kernels launches (ncu --set full)")
    ap.add_argument("--json")
    ap.add_argument("--from-ncu-csv", nargs=2, metavar=("FASTGEN", "FULL"),
                    help="make the results file from two saved outputs of the same ncu command instead of running it")
    ap.add_argument("--ncu-command", help="--from-ncu-csv: the ncu command line that wrote them, for the record")
    ap.add_argument("--measured", nargs=3, metavar=("MACHINE", "COMMIT", "WHEN"),
                    help="--from-ncu-csv: the GPU, the commit built there and when the files were written")
    a = ap.parse_args()
    if a.from_ncu_csv:
        from bench_gpu import run_info  # beside this script

        if not (a.ncu_command and a.measured):
            ap.error("--from-ncu-csv needs --ncu-command and --measured")
        res = run_info()  # this conversion; the measurement's machine, commit and time replace its own
        res["source"] = {"files": a.from_ncu_csv, "ncu_command": a.ncu_command}
        res["machine"], res["commit"], res["started"] = a.measured
        for name, f in zip(("fastgen", "full"), a.from_ncu_csv):
            with open(f) as fh:
                res[name] = parse(fh.read())
        print(markdown(res, a.tokens))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if a.from_json:
        print(markdown(json.load(a.from_json), a.tokens if "--tokens" in sys.argv else 0))
        return 0
    if not (a.llama_bench and a.model):
        ap.error("--llama-bench and --model are needed (or --from-json)")
    if a.prompt:
        a.tokens = 0
    from bench_gpu import run_info  # beside this script

    res = run_info()
    if a.stalls:
        if not a.kernels:
            ap.error("--stalls needs --kernels REGEX")
        for name, env in (("fastgen", {}), ("full", {"LLAMA_FASTGEN_DISABLE": "1"})):
            res[name] = stalls(a.llama_bench, a.model, a.depth, a.tokens, env, a.kernels, a.launch_skip, a.launch_count or 2, a.prompt)
        print(f"Stall reasons of {a.kernels!r} at depth {a.depth}" + (f", {a.prompt}-token prompt" if a.prompt else "")
              + " (ncu --set full, clocks left alone)")
        print_stalls(res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    for name, env in (("fastgen", {}), ("full", {"LLAMA_FASTGEN_DISABLE": "1"})):
        res[name] = profile(a.llama_bench, a.model, a.depth, a.tokens, env, a.prompt, a.kernels, a.launch_count)
    # the depth prefill is profiled too: compare the totals, and the kernels by name
    print(f"GPU kernel time (us, all kernels of prefill to depth {a.depth} + a {a.prompt}-token prompt + {a.tokens} decode tokens)")
    runs = {n: res[n] for n in ("fastgen", "full")}
    names = sorted(set().union(*(r["us_by_kernel"] for r in runs.values())),
                   key=lambda k: -max(r["us_by_kernel"].get(k, 0) for r in runs.values()))
    print(f"  {'kernel':60s}" + "".join(f"{n:>12s}" for n in runs))
    for k in names[:25]:
        print(f"  {k[:60]:60s}" + "".join(f"{r['us_by_kernel'].get(k, 0.0):12.1f}" for r in runs.values()))
    print(f"  {'TOTAL':60s}" + "".join(f"{sum(r['us_by_kernel'].values()):12.1f}" for r in runs.values()))
    print(f"  {'kernels launched':60s}" + "".join(f"{r['kernels']:12d}" for r in runs.values()))
    if a.kernels or a.launch_count:
        print("us per launch (launches)")
        for k in names[:25]:
            print(f"  {k[:60]:60s}" + "".join(
                f"{r['us_by_kernel'][k] / r['launches_by_kernel'][k]:7.1f} ({r['launches_by_kernel'][k]:3d})" if k in r["us_by_kernel"]
                else f"{'-':>12s}" for r in runs.values()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
