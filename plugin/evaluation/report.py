"""What a run leaves behind: plots, markdown tables for docs/RESULTS.md, the machine and commit."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from llama_fastgen.evaluation import configs

REPO = Path(__file__).resolve().parents[2]  # a development install: the checkout (else git finds nothing)


def plot(out: dict, stem: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(f"{stem}-{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if out.get("quality"):
        longest = out["ranges"][-1]
        q = [r for r in out["quality"] if r["config"] != "full f16" and r["range"] == longest]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "kl_mean", "KL(full || config), mean"), (axes[1], "top1", "top-1 agreement")):
            for r in q:
                ax.plot(100 * r["kv_ratio"], r[key], "o" if r["family"].startswith("fastgen") else "s", label=r["config"])
            ax.set_xlabel("KV bytes allocated, % of full f16")
            ax.set_ylabel(label)
            if key == "kl_mean":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6)
        fig.suptitle(f"{Path(out['model']).name}: quality vs KV memory (held-out tokens {longest})", fontsize=9)
        save(fig, "quality")
    if out.get("retrieval"):
        tasks_ = list(dict.fromkeys(r["task"] for r in out["retrieval"]))
        fig, axes = plt.subplots(1, len(tasks_), figsize=(4.2 * len(tasks_), 4), squeeze=False)
        names = list(dict.fromkeys(r["config"] for r in out["retrieval"]))
        for ax, t in zip(axes[0], tasks_):
            for i, name in enumerate(names):
                rs = sorted((r for r in out["retrieval"] if r["task"] == t and r["config"] == name), key=lambda r: r["length"])
                x = [r["length"] * (1 + 0.03 * (i - len(names) / 2)) for r in rs]   # dodge overlapping bars
                y = [r["accuracy"] for r in rs]
                err = [[r["accuracy"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["accuracy"] for r in rs]]
                ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("prompt tokens")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (Wilson 95% CI)")
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(f"{Path(out['model']).name}: retrieval, {out['retrieval'][0]['trials']} trials per point", fontsize=9)
        save(fig, "retrieval")
    if out.get("memory"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["config"] for r in out["memory"]):
            rs = [r for r in out["memory"] if r["config"] == name]
            ax.plot([r["n_ctx"] for r in rs], [r["kv_bytes"] / 2**20 for r in rs], "o-", label=name, ms=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_ctx")
        ax.set_ylabel("KV MiB allocated")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        save(fig, "memory")
    return paths


def spread(xs: list[float]) -> dict:
    """median, min, max and count of repeated measurements (the benchmarks' summary of a figure)"""
    import statistics

    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def mask_timing(stderr: str) -> dict | None:
    """The decode-step class masks line LLAMA_FASTGEN_TIMING=1 prints at exit (llama-fastgen-timing.cpp), parsed:
    filled / updated counts and µs each; None when the output has no such line."""
    import re

    m = re.search(r"decode-step class masks: (\d+) filled over every cell \(([\d.]+) us each\), (\d+) updated from "
                  r"the last step \(([\d.]+) us each\)", stderr)
    return m and {"filled": int(m.group(1)), "fill_us": float(m.group(2)), "updated": int(m.group(3)),
                  "update_us": float(m.group(4))}


def ubatch_timing(stderr: str) -> dict | None:
    """The heavy-hitter stores' ubatch line LLAMA_FASTGEN_TIMING=1 prints at exit (llama-fastgen-timing.cpp),
    parsed: ubatches applied, evicting, and that waited for the device; ms per phase; None without the line."""
    import re

    m = re.search(r"(\d+) ubatches \((\d+) evicting\): wait ([\d.]+) ms, read ([\d.]+) ms, evict ([\d.]+) ms, "
                  r"place\+upload ([\d.]+) ms; then, in (\d+) that waited, host until inputs set ([\d.]+) ms", stderr)
    return m and {"applied": int(m.group(1)), "evicting": int(m.group(2)), "wait_ms": float(m.group(3)),
                  "read_ms": float(m.group(4)), "evict_ms": float(m.group(5)), "place_ms": float(m.group(6)),
                  "waited": int(m.group(7)), "after_wait_ms": float(m.group(8))}


def machine() -> dict:
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    out = {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}
    if configs.GPU_LAYERS:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        out["gpu"] = r.stdout.strip() or "unknown"
    return out


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _bench_parser(description: str, reps: int, gguf_required: bool):
    """A benchmark's command line: --gguf, --reps and --json (the rest is the caller's)."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=gguf_required, help="a fastgen GGUF (convert.py --profile)")
    ap.add_argument("--reps", type=int, default=reps, help=f"repetitions per configuration (default {reps})")
    ap.add_argument("--json", type=Path, help="write the results here")
    return ap


def _check_gguf(ap, gguf: str) -> None:
    if not Path(gguf).is_file():
        ap.error(f"{gguf} does not exist: convert a model first (converter/convert.py --profile)")


def document_bench_args(description: str, doc_tokens: int, ctx: int, reps: int, extra=None):
    """The command line of a benchmark on one long document (bench_reuse.py, bench_spec.py): --gguf,
    --doc-tokens, --ctx, --reps and --json, plus extra(ap)'s arguments; parsed, the GGUF checked."""
    ap = _bench_parser(description, reps, gguf_required=True)
    ap.add_argument("--doc-tokens", type=int, default=doc_tokens, help=f"document length in tokens (default {doc_tokens})")
    ap.add_argument("--ctx", type=int, default=ctx, help=f"n_ctx (default {ctx})")
    if extra:
        extra(ap)
    a = ap.parse_args()
    _check_gguf(ap, a.gguf)
    return ap, a


def decode_bench_args(description: str, steps: int, reps: int, table, extra=None):
    """The command line of a decode benchmark over fresh processes (bench_masks.py, bench_rpc.py): --gguf,
    --steps, --reps, --json and --from-json, plus extra(ap)'s arguments. With --from-json, prints
    table(results) and returns None; otherwise the parsed arguments, the GGUF checked."""
    import json

    ap = _bench_parser(description, reps, gguf_required=False)   # not with --from-json
    ap.add_argument("--steps", type=int, default=steps, help=f"decode steps after the prompt (default {steps})")
    ap.add_argument("--from-json", type=Path, help="print the markdown table of a results file")
    if extra:
        extra(ap)
    a = ap.parse_args()
    if a.from_json:
        print(table(json.loads(a.from_json.read_text())))
        return None
    if not a.gguf:
        ap.error("--gguf: a fastgen GGUF is needed (converter/convert.py --profile), or --from-json")
    _check_gguf(ap, a.gguf)
    return a


def document_bench_preamble(r: dict, *details: str) -> str:
    """The line above a one-document benchmark's table (bench_reuse.py, bench_spec.py): what ran, where, when, how."""
    return ", ".join([f"{r['gguf']}, document {r['doc_tokens']} tokens (prompt {r['rows'][0]['prompt_tokens']})",
                      f"n_ctx {r['n_ctx']}", *details, f"{r['machine']['cpu']} ({r['machine']['cores']} cores)",
                      f"commit `{r['commit'][:12]}`", f"{r['started']}; `{r['command']}`"])


def held_out_document(gguf: str, n_tokens: int) -> str:
    """The first held-out essay cut to n_tokens tokens of the GGUF's tokenizer: the benchmarks' long document."""
    from llama_cpp import Llama

    from llama_fastgen.evaluation import tasks

    probe = Llama(model_path=gguf, n_ctx=256, vocab_only=True, verbose=False)
    try:
        return probe.detokenize(probe.tokenize(tasks.held_out()[0].encode(), add_bos=False)[:n_tokens]).decode(errors="ignore")
    finally:
        probe.close()


# where files go and which commit is measured: environment words of that prefix that are not switches of what runs
_ENV_NOT_SWITCHES = {"LLAMA_FASTGEN_CACHE", "LLAMA_FASTGEN_COMMIT", "LLAMA_FASTGEN_EVAL_CACHE"}


def command_line(argv: list[str]) -> str:
    """argv as the shell line that ran it, for a results file: the LLAMA_FASTGEN_* and GGML_* switches set in the
    environment first (an A/B run that exported one measured something else, and its file says so)."""
    import shlex

    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())  # K='a b', not 'K=a b': an assignment
           if k.startswith(("LLAMA_FASTGEN_", "GGML_")) and k not in _ENV_NOT_SWITCHES]
    return " ".join(env + [shlex.join(argv)])


def write_results(path: Path, results: dict, measured: str, t_start: float) -> None:
    """A benchmark's results JSON with where it came from: the command line as typed (shell-quoted), the
    commit measured (taken when the run started), the machine, the start (UTC) and the duration."""
    import json
    import sys
    import time
    from datetime import datetime, timezone

    out = {**results, "command": command_line(["python", *sys.argv]), "commit": measured, "machine": machine(),
           "started": datetime.fromtimestamp(t_start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "seconds": round(time.time() - t_start)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def markdown(results: list[dict]) -> str:
    """Tables for docs/RESULTS.md, generated from result JSONs (never typed by hand)."""
    out = []
    for r in results:
        out.append(f"### {Path(r['model']).name}: `{r['command']}`\n")
        gpu = f", GPU {r['machine']['gpu']} (all layers and KV offloaded)" if r["machine"].get("gpu") else ""
        out.append(f"{r['machine']['cpu']} ({r['machine']['cores']} cores){gpu}, commit `{r['commit'][:12]}`, "
                   f"{r['started']}, {r['seconds']} s; ubatch {r['n_ubatch']}; byte targets at n_ctx {r['n_ctx']}."
                   + ("" if r.get("complete", True) else " **Incomplete**: the run stopped before its end; '-' marks a "
                      "cell it did not reach.") + "\n")
        for e in r.get("earlier_runs", []):
            out.append(f"Cells kept from an earlier run: commit `{e['commit'][:12]}`, `{e['command']}`.\n")
        if r.get("quality"):
            # each range runs at its own n_ctx (the next power of two), so the bytes differ per range
            out.append("| config | " + " | ".join(f"KV % {q} | KL {q} | top-1 {q}" for q in r["ranges"]) + " |")
            out.append("|---|" + "---|---|---|" * len(r["ranges"]))
            for name in dict.fromkeys(q["config"] for q in r["quality"]):
                rows = {q["range"]: q for q in r["quality"] if q["config"] == name}
                out.append(f"| {name} | " + " | ".join(
                    f"{x['kv_ratio']:.1%} | {x['kl_mean']:.4f} | {x['top1']:.1%}" if (x := rows.get(q)) else "- | - | -"
                    for q in r["ranges"]) + " |")
            out.append("")
        if r.get("retrieval"):
            cols = list(dict.fromkeys((x["task"], x["length"]) for x in r["retrieval"]))
            out.append(f"| config | KV % of f16 at n_ctx {r['n_ctx']} | " + " | ".join(f"{t} {n // 1024}K" for t, n in cols) + " |")
            out.append("|---|---|" + "---|" * len(cols))
            ratio = {q["config"]: q["kv_ratio"] for q in r.get("memory_at_ctx", r.get("memory_8k", []))}
            for name in dict.fromkeys(x["config"] for x in r["retrieval"]):
                cells = {(x["task"], x["length"]): x for x in r["retrieval"] if x["config"] == name}
                out.append(f"| {name} | {ratio.get(name, float('nan')):.1%} | " + " | ".join(
                    f"{c['correct']}/{c['trials']} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if (c := cells.get(k)) else "-"
                    for k in cols) + " |")
            out.append("")
        if r.get("speed"):
            depths = list(dict.fromkeys(x["depth"] for x in r["speed"]))
            out.append("| config | " + " | ".join(f"decode tok/s at {d}" + (f" | prefill tok/s to {d}" if d else "")
                                                for d in depths) + " |")
            out.append("|---|" + "---|" * sum(2 if d else 1 for d in depths))
            for name in dict.fromkeys(x["config"] for x in r["speed"]):
                cells = []
                for x in (x for x in r["speed"] if x["config"] == name):
                    cells.append(f"{x['decode_tps']:.1f} [{x['decode_tps_min']:.1f}, {x['decode_tps_max']:.1f}]")
                    if x["depth"]:
                        cells.append(f"{x['prefill_tps']:.0f} [{x['prefill_tps_min']:.0f}, {x['prefill_tps_max']:.0f}]")
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append(f"\nmedian of {r['speed'][0]['reps']} repetitions [min, max]\n")
    return "\n".join(out)
