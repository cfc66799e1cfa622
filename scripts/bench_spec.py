#!/usr/bin/env python3
"""Speculative decoding with prompt-lookup drafts: decode speed with and without drafts, fastgen cache
against the full cache of one GGUF.

The prompt is a document of --doc-tokens tokens (the pinned essays) and a request to repeat its first
paragraph, so that llama-cpp-python's LlamaPromptLookupDecoding finds drafts in the prompt. --tokens
greedy tokens are decoded; the time runs from the first generated token to the last (the prompt is not
timed). A rejected draft is removed from the compressed cache's history natively (a draft model turns
the kv override fastgen.undo_tokens on), or, where the cache cannot take a step back (its heavy-hitter
heads evict before it, or the override is 0), llama_fastgen.checkpoints restores the checkpoint taken
before the drafts and evaluates the accepted tokens again. --reps repetitions per configuration (a new
Llama every repetition), median with min/max:

  full cache (fastgen.enable=false) | fastgen | fastgen, undo_tokens 0    x    no drafts | prompt-lookup drafts

    python scripts/bench_spec.py --gguf out/smollm2.gguf --json docs/results/spec-smollm2-cpu.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import llama_fastgen  # noqa: E402  (before llama_cpp: our libllama)
from llama_fastgen import schema  # noqa: E402
from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # noqa: E402

from llama_fastgen.evaluation.report import (commit, document_bench_args, document_bench_preamble, held_out_document,  # noqa: E402
                                             spread, write_results)

REQUEST = "\n\nRepeat the {} paragraph of the text above word for word:\n"
CACHES = {"full cache": {"kv_overrides": dict(schema.STOCK_CACHE)}, "fastgen": {},
          "fastgen, undo_tokens 0": {"kv_overrides": {schema.KEYS["UNDO_TOKENS"]: 0}}}


def one_rep(gguf: str, kw: dict, doc: str, n_ctx: int, n_tokens: int, draft: int, which: str) -> dict:
    from llama_fastgen import checkpoints

    # logits_all=True: llama-cpp-python 0.3.36 sizes its logits too small for a draft model otherwise
    llm = Llama(model_path=gguf, n_ctx=n_ctx, verbose=False, logits_all=True,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=draft) if draft else None, **kw)
    try:
        prompt = llm.tokenize((doc + REQUEST.format(which)).encode())
        tokens, t_first, steps = [], 0.0, []
        decode = llm._ctx.decode
        llm._ctx.decode = lambda batch: (steps.append(batch.batch.n_tokens), decode(batch))[1]
        for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            if not tokens:
                t_first = time.perf_counter()
                steps.clear()   # the prompt's
            tokens.append(int(tok))
            if len(tokens) == n_tokens:
                break
        dt = time.perf_counter() - t_first
        cps = checkpoints.of(llm)
        return {"tok_s": (len(tokens) - 1) / dt, "tokens": tokens, "steps": len(steps), "restored": cps.restored if cps else 0,
                "saved": cps.saved if cps else 0, "checkpoint_bytes": cps.nbytes if cps else 0,
                "kv_bytes": llama_fastgen.native.cache_stats(llm)["kv_bytes"], "prompt_tokens": len(prompt)}
    finally:
        llm.close()


def main() -> int:
    def extra(ap):
        ap.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded (default 64)")
        ap.add_argument("--draft", type=int, default=4, help="prompt-lookup draft length (default 4)")
        ap.add_argument("--repeat", choices=["first", "last"], default="first",
                        help="which paragraph of the document the request asks to repeat (default first)")
    ap, a = document_bench_args(__doc__, doc_tokens=2000, ctx=4096, reps=3, extra=extra)
    if a.doc_tokens + a.tokens + 64 > a.ctx:
        ap.error(f"--doc-tokens {a.doc_tokens} and --tokens {a.tokens} do not fit --ctx {a.ctx}")

    doc = held_out_document(a.gguf, a.doc_tokens)

    t_start, measured = time.time(), commit()   # the code that runs (edits during the run do not count)
    rows = []
    print(f"{a.gguf}: document {a.doc_tokens} tokens, n_ctx {a.ctx}, {a.tokens} greedy tokens, {a.reps} repetitions")
    print(f"  {'config':<38} {'decode tok/s':>22}  tokens/step  saved  restored  checkpoints MiB  KV MiB  same tokens as without drafts")
    for cache, kw in CACHES.items():
        plain = None
        for draft in ((a.draft,) if "undo" in cache else (0, a.draft)):   # without drafts the override changes nothing
            reps = [one_rep(a.gguf, kw, doc, a.ctx, a.tokens, draft, a.repeat) for _ in range(a.reps)]
            name = f"{cache}, " + (f"drafts of {draft}" if draft else "no drafts")
            row = {"config": name, "cache": cache, "draft": draft, "tok_s": spread([r["tok_s"] for r in reps]),
                   "restored": [r["restored"] for r in reps], "saved": [r["saved"] for r in reps],
                   "steps": [r["steps"] for r in reps],
                   "checkpoint_bytes": max(r["checkpoint_bytes"] for r in reps), "kv_bytes": reps[0]["kv_bytes"],
                   "prompt_tokens": reps[0]["prompt_tokens"], "tokens": reps[0]["tokens"]}
            if plain is None:   # the same cache's tokens without drafts (the override's: fastgen's)
                plain = row["tokens"] if draft == 0 else next(r["tokens"] for r in rows if r["cache"] == "fastgen" and not r["draft"])
            row["same_tokens"] = all(r["tokens"] == plain for r in reps)
            rows.append(row)
            s = row["tok_s"]
            print(f"  {name:<38} {s['median']:7.1f} [{s['min']:.1f}, {s['max']:.1f}]   {a.tokens * a.reps / sum(row['steps']):10.2f}"
                  f"  {sum(row['saved']):5d}  "
                  f"{sum(row['restored']):8d}  {row['checkpoint_bytes'] / 2**20:15.1f}  {row['kv_bytes'] / 2**20:6.1f}  "
                  f"{row['same_tokens']}", flush=True)
    if a.json:
        write_results(a.json, {"gguf": Path(a.gguf).name, "doc_tokens": a.doc_tokens, "n_ctx": a.ctx, "reps": a.reps,
                               "n_tokens": a.tokens, "draft": a.draft, "repeat": a.repeat, "rows": rows}, measured, t_start)
    return 0


def markdown(path: Path) -> str:
    """The table of a results JSON, for docs/RESULTS.md."""
    r = json.loads(path.read_text())
    ask = f"the request repeats the {r.get('repeat', 'first')} paragraph"
    lines = [document_bench_preamble(r, ask, f"{r['n_tokens']} greedy tokens", f"{r['reps']} repetitions"), "",
             "| config | decode tok/s | tokens per step | checkpoints saved | restored | checkpoints MiB (host) | KV MiB | same tokens as without drafts |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        s, kv = row["tok_s"], f"{row['kv_bytes'] / 2**20:.1f}" if "kv_bytes" in row else "-"
        saved = sum(row["saved"]) if "saved" in row else "-"
        per_step = f"{r['n_tokens'] * r['reps'] / sum(row['steps']):.2f}" if "steps" in row else "-"
        lines.append(f"| {row['config']} | {s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}] | {per_step} | {saved} | {sum(row['restored'])} | "
                     f"{row['checkpoint_bytes'] / 2**20:.1f} | {kv} | {'yes' if row['same_tokens'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
