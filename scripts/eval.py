#!/usr/bin/env python3
"""Quality, memory and speed of fastgen against the full cache and uniform baselines, in one run.

For one HF model directory (default: the bundled SmolLM2-135M-Instruct) this profiles and converts
at each threshold (with the full ladder, and without its heavy-hitter rungs), builds uniform
baselines at the KV bytes of fastgen T=0.95, and runs every configuration through the native cache:

  full f16 (reference) | fastgen T | fastgen T without frequent | StreamingLLM (sinks + window on
  every head) | H2O (heavy hitters + window on every head) | full q8_0 | full q4_0 | fastgen + q8_0

quality   held-out text (Python's documentation, pydoc_data.topics: ships with Python, not in the
          calibration set) prefilled in ubatches of 64 up to the scored part, then decoded one
          token per llama_decode as generation does; per position KL(full || config), top-1
          agreement, perplexity
retrieval passkey and needle-in-a-haystack at several lengths and depths (scripts/eval_tasks.py)
memory    KV bytes the context allocates (C API) at several n_ctx
speed     CPU decode tokens/s at several depths, prefill tokens/s (this machine's cores)

Prints tables, writes JSON (--json) and PNG plots next to it. Everything is computed here.

    python scripts/eval.py --quick --json docs/results/eval-quick.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGML_TYPE = {"f16": 1, "q4_0": 2, "q8_0": 8}
held_out_text = eval_tasks.held_out_text


# ---------------------------------------------------------------- configurations

class Config:
    """A GGUF plus how to run it: fastgen on or off, KV cache type."""

    def __init__(self, name: str, gguf: Path, fastgen: bool = True, kv: str = "f16", family: str = ""):
        self.name, self.gguf, self.fastgen, self.kv, self.family = name, gguf, fastgen, kv, family or name

    def llama_kwargs(self) -> dict:
        kw = {"flash_attn": True}
        if not self.fastgen:
            kw["kv_overrides"] = {"fastgen.enable": False}
        if self.kv != "f16":
            kw.update(type_k=GGML_TYPE[self.kv], type_v=GGML_TYPE[self.kv])
        return kw


def run_config(gguf: Path, ids: list[int], n_ctx: int, fastgen: bool, kv_q8: bool, decode_from: int | None = None):
    """Teacher-forced logits and cache stats (kept for tests/test_eval.py)."""
    c = Config("x", gguf, fastgen, "q8_0" if kv_q8 else "f16")
    return teacher_forced(c, ids, n_ctx, decode_from)


def teacher_forced(cfg: Config, ids, n_ctx, decode_from=None):
    from llama_fastgen.logits import teacher_forced as tf

    return tf(cfg.gguf, ids, n_ctx=n_ctx, n_batch=64, decode_from=decode_from, **cfg.llama_kwargs())


def compare(full: np.ndarray, other: np.ndarray, ids: list[int], start: int) -> dict:
    def logp(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = logp(full[start:-1]), logp(other[start:-1])
    nxt = np.array(ids[start + 1:])
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
            "top1": float((p.argmax(-1) == q.argmax(-1)).mean()),
            "ppl": float(np.exp(-q[np.arange(len(nxt)), nxt].mean())), "positions": int(len(nxt))}


def uniform_gguf(model_dir: Path, window: int, protected_frac: float, out: Path, policy=None, punct: bool = True) -> Path:
    """Every KV head on one policy (default special+punct+local(window)): a uniform baseline."""
    from transformers import AutoConfig, AutoTokenizer

    from llama_fastgen import schema
    from llama_fastgen.converter import gguf_export, tokens
    from llama_fastgen.converter.architectures import shape

    n_layer, _, n_kv, _ = shape(AutoConfig.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = policy or schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, window)
    meta = schema.FastgenMetadata(
        threshold=0.0, n_sink=4, classes=[policy], layer_class_heads=[[n_kv]] * n_layer,
        head_perm=[list(range(n_kv))] * n_layer, special_token_ids=tokens.special_ids(tok),
        punct_token_ids=tokens.punct_ids(tok) if punct else [],
        protected_frac=protected_frac if punct else 0.0, calibration={"uniform_baseline": policy.label})
    return gguf_export.convert(model_dir, out, "f32", extra_kv=meta.to_kv())


def largest_under(make, sizes, target: int, head_dim: int, n_ctx: int, n_heads: int):
    """The largest policy make(size) whose uniform cache stays within `target` bytes."""
    from llama_fastgen import schema

    best = make(sizes[0])
    for s in sizes:
        p = make(s)
        m = schema.FastgenMetadata(threshold=0, n_sink=4, classes=[p], layer_class_heads=[[n_heads]], head_perm=[[0]],
                                   special_token_ids=[], punct_token_ids=[], protected_frac=0.0)
        if schema.kv_bytes(m, head_dim, n_ctx, 64)[0] <= target:
            best = p
    return best


def build_configs(model_dir: Path, work: Path, thresholds, n_ctx: int, head_dim: int, n_heads: int) -> list[Config]:
    from llama_fastgen import schema
    from llama_fastgen.converter import convert
    from llama_fastgen.converter.policies import frequent_rung

    cfgs: list[Config] = []
    for t in thresholds:
        for frequent in (True, False):
            g = work / f"fastgen-T{t}{'' if frequent else '-nofreq'}.gguf"
            if not g.exists():
                args = [str(model_dir), "--profile", "--outfile", str(g), "--outtype", "f32", "--threshold", str(t),
                        "--no-quality"] + ([] if frequent else ["--no-frequent"])
                assert convert.main(args) == 0
            cfgs.append(Config(f"fastgen T={t}" + ("" if frequent else " no-freq"), g,
                               family="fastgen" if frequent else "fastgen no-freq"))
    mid = next((c for c in cfgs if c.name == "fastgen T=0.95"), cfgs[0])
    stock = mid.gguf
    target = teacher_forced(mid, [1, 2, 3], n_ctx)[1]["kv_bytes"]
    sizes = [2 ** k for k in range(4, 15)]
    stream = largest_under(lambda w: schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, w), sizes, target, head_dim, n_ctx, n_heads)
    h2o = largest_under(frequent_rung, [s for s in sizes if s >= 64], target, head_dim, n_ctx, n_heads)
    for p, name in ((stream, f"StreamingLLM sinks+local{stream.window}"), (h2o, f"H2O {h2o.label}")):
        g = work / f"uniform-{p.label.replace('+', '_')}.gguf"
        if not g.exists():
            uniform_gguf(model_dir, p.window, 0.0, g, policy=p, punct=False)
        cfgs.append(Config(name, g, family=name.split()[0]))
    cfgs += [Config("full q8_0", stock, fastgen=False, kv="q8_0"), Config("full q4_0", stock, fastgen=False, kv="q4_0"),
             Config("fastgen T=0.95+q8_0", mid.gguf, kv="q8_0", family="fastgen+q8_0")]
    return [Config("full f16", stock, fastgen=False, family="full")] + cfgs


# ---------------------------------------------------------------- measurements

def quality(cfgs, ids, n_ctx, start) -> list[dict]:
    rows, full = [], None
    print(f"\nquality: {len(ids)} held-out tokens, prefill to {start} in ubatches of 64, then one token per decode")
    for c in cfgs:
        t0 = time.time()
        logits, st = teacher_forced(c, ids, n_ctx, decode_from=start)
        if full is None:
            full, full_bytes = logits, st["kv_bytes"]
        r = {"config": c.name, "family": c.family, "kv_bytes": st["kv_bytes"], "kv_ratio": st["kv_bytes"] / full_bytes,
             **compare(full, logits, ids, start)}
        rows.append(r)
        print(f"  {c.name:34s} KV {r['kv_bytes'] / 2**20:7.1f} MiB ({r['kv_ratio']:6.1%})  KL {r['kl_mean']:.4f}  "
              f"top-1 {r['top1']:.3f}  ppl {r['ppl']:6.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return rows


def retrieval(cfgs, tok, lengths, depths, trials) -> list[dict]:
    import llama_fastgen  # noqa: F401
    from llama_cpp import Llama

    haystack = held_out_text()
    rows = []
    print(f"\nretrieval: lengths {lengths}, depths {depths}, {trials} trial(s) per cell")
    for c in cfgs:
        for n in lengths:
            llm = Llama(model_path=str(c.gguf), n_ctx=n + 64, n_batch=512, verbose=False, **c.llama_kwargs())
            try:
                for task in ("passkey", "needle"):
                    for d in depths:
                        ok = 0
                        for s in range(trials):
                            ids, key = (eval_tasks.passkey(tok, n, d, s) if task == "passkey"
                                        else eval_tasks.needle(tok, n, d, s, haystack))
                            ok += key in eval_tasks.answer(llm, ids)
                        rows.append({"config": c.name, "task": task, "length": n, "depth": d, "accuracy": ok / trials})
            finally:
                llm.close()
        acc = {t: np.mean([r["accuracy"] for r in rows if r["config"] == c.name and r["task"] == t]) for t in ("passkey", "needle")}
        print(f"  {c.name:34s} passkey {acc['passkey']:.2f}  needle {acc['needle']:.2f}", flush=True)
    return rows


def memory(cfgs, contexts) -> list[dict]:
    import llama_fastgen
    from llama_cpp import Llama

    rows = []
    for c in cfgs:
        for n in contexts:
            llm = Llama(model_path=str(c.gguf), n_ctx=n, n_batch=512, verbose=False, **c.llama_kwargs())
            st = llama_fastgen.native.cache_stats(llm)
            llm.close()
            rows.append({"config": c.name, "n_ctx": n, "kv_bytes": st["kv_bytes"], "full_f16_bytes": st["full_bytes"]})
    print("\nKV bytes allocated (MiB) by n_ctx")
    print("  " + f"{'config':34s}" + "".join(f"{n:>9}" for n in contexts))
    for c in cfgs:
        print("  " + f"{c.name:34s}" + "".join(f"{r['kv_bytes'] / 2**20:9.1f}" for r in rows if r["config"] == c.name))
    return rows


def speed(cfgs, tok_ids, depths, n_gen: int = 32) -> list[dict]:
    """CPU tokens/s through llama-cpp-python: prefill to each depth, then n_gen single-token decodes."""
    import llama_fastgen  # noqa: F401
    from llama_cpp import Llama

    rows = []
    for c in cfgs:
        llm = Llama(model_path=str(c.gguf), n_ctx=max(depths) + n_gen + 64, n_batch=512, verbose=False, **c.llama_kwargs())
        try:
            for d in depths:
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(tok_ids[:d] if d else tok_ids[:1])
                pp = max(d, 1) / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for t in tok_ids[d: d + n_gen]:
                    llm.eval([t])
                tg = n_gen / (time.perf_counter() - t0)
                rows.append({"config": c.name, "depth": d, "decode_tps": tg, "prefill_tps": pp if d else None})
        finally:
            llm.close()
    print(f"\nCPU speed ({os.cpu_count()} cores): decode tokens/s at depth (prefill tokens/s)")
    for c in cfgs:
        cells = [f"d{r['depth']}: {r['decode_tps']:6.1f}" + (f" ({r['prefill_tps']:.0f})" if r["prefill_tps"] else "")
                 for r in rows if r["config"] == c.name]
        print(f"  {c.name:34s} " + "   ".join(cells))
    return rows


# ---------------------------------------------------------------- plots

def plot(out: dict, stem: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    q = [r for r in out["quality"] if r["config"] != "full f16"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = {"fastgen": "o-", "fastgen no-freq": "s--", "StreamingLLM": "^", "H2O": "v", "full": "x",
             "fastgen+q8_0": "D"}
    fams = sorted({r["family"] for r in q}, key=lambda f: (not f.startswith("fastgen"), f))
    for ax, key, label in ((axes[0], "kl_mean", "KL(full || config), mean"), (axes[1], "top1", "top-1 agreement")):
        for f in fams:
            rs = sorted((r for r in q if r["family"] == f), key=lambda r: r["kv_ratio"])
            ax.plot([100 * r["kv_ratio"] for r in rs], [r[key] for r in rs], marks.get(f.split()[0] if f not in marks else f, "o"),
                    label=f if len(rs) > 1 else rs[0]["config"])
        ax.set_xlabel("KV bytes allocated, % of full f16")
        ax.set_ylabel(label)
        if key == "kl_mean":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{Path(out['model']).name}: quality vs KV memory (n_ctx {out['n_ctx']}, {out['tokens']} held-out tokens)", fontsize=9)
    fig.tight_layout()
    p = f"{stem}-quality.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

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
    fig.tight_layout()
    p = f"{stem}-memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="HF model directory (default: the bundled model)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.91, 0.95, 0.98])
    ap.add_argument("--quick", action="store_true",
                    help="T = 0.95 only, 1,200 tokens, retrieval at 2K, small speed sweep (minutes on 2 cores)")
    ap.add_argument("--tokens", type=int, default=2500, help="held-out tokens for the quality run")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000], help="retrieval lengths")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="retrieval depths")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write results here (plots go next to it)")
    ap.add_argument("--workdir", type=Path, help="keep GGUFs here (default: a temporary folder)")
    a = ap.parse_args()
    if a.quick:
        a.thresholds, a.tokens, a.lengths, a.depths, a.trials = [0.95], 1200, [2048], [0.5], 1
    model_dir = a.model_dir or Path(subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py")],
                                                   capture_output=True, text=True, check=True).stdout.strip())
    import llama_fastgen  # noqa: F401  (our libllama before anything else loads one)
    from transformers import AutoConfig, AutoTokenizer

    from llama_fastgen.converter.architectures import shape

    t_start = time.time()
    n_layer, _, n_kv, head_dim = shape(AutoConfig.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tok(held_out_text())["input_ids"]
    ids = text_ids[: a.tokens]
    n_ctx = 1 << (len(ids) - 1).bit_length()
    start = min(1000, len(ids) // 2)  # scored part: past most windows and budgets
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fastgen-eval-"))
    work.mkdir(parents=True, exist_ok=True)

    cfgs = build_configs(model_dir, work, a.thresholds, n_ctx, head_dim, n_layer * n_kv)
    out = {"model": str(model_dir), "n_ctx": n_ctx, "tokens": len(ids), "scored_from": start,
           "text": "pydoc_data.topics (Python documentation)", "cpu_cores": os.cpu_count(),
           "command": "python scripts/eval.py " + " ".join(sys.argv[1:])}
    out["quality"] = quality(cfgs, ids, n_ctx, start)
    main_cfgs = [c for c in cfgs if c.name in ("full f16", "fastgen T=0.95", "fastgen T=0.95 no-freq", "full q8_0")
                 or c.family in ("StreamingLLM", "H2O")]
    out["retrieval"] = retrieval(main_cfgs, tok, a.lengths, a.depths, a.trials)
    mem_cfgs = [c for c in cfgs if c.kv == "f16" or c.name in ("full q8_0", "full q4_0")]
    out["memory"] = memory(mem_cfgs, [2048, 8192, 32768] if a.quick else [2048, 4096, 8192, 16384, 32768])
    speed_cfgs = [c for c in cfgs if c.name in ("full f16", "fastgen T=0.95", "fastgen T=0.95 no-freq", "full q8_0")]
    out["speed"] = speed(speed_cfgs, text_ids, [0, 2048] if a.quick else [0, 2048, 8000])
    out["seconds"] = round(time.time() - t_start)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
        out["plots"] = plot(out, a.json.with_suffix(""))
        a.json.write_text(json.dumps(out, indent=1))
        print("\nwrote", a.json, *out["plots"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
