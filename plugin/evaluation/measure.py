"""The measurements: teacher-forced quality against the full cache, retrieval trials, KV bytes,
CPU speed. They run in the measuring child (no torch: see child.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from llama_fastgen.evaluation import tasks as eval_tasks
from llama_fastgen.evaluation.configs import Config


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
