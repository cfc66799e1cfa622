#!/usr/bin/env python3
"""Several questions about one long document: time to the first token of each later question.

The first prompt is a document of --doc-tokens tokens (the pinned essays) and a question, answered
with --answer-tokens greedy tokens; each later prompt is the same document with another question,
as a user asking again would send it. llama-cpp-python reuses the common prefix: the full cache
drops the old question and answer, the fastgen cache restores a checkpoint taken inside the first
prompt (llama_fastgen.checkpoints) and evaluates the document's end again; without checkpoints it
evaluates the whole prompt again. Three configurations of one GGUF, --reps repetitions each
(a new Llama every repetition), median with min/max:

  full cache (fastgen.enable=false) | fastgen | fastgen, checkpoints off (LLAMA_FASTGEN_CHECKPOINTS=0)

    python scripts/bench_reuse.py --gguf out/smollm2.gguf --json docs/results/reuse-smollm2-cpu.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import llama_fastgen  # noqa: E402  (before llama_cpp: our libllama)
from llama_fastgen import schema  # noqa: E402
from llama_cpp import Llama  # noqa: E402

from llama_fastgen import checkpoints  # noqa: E402  (numpy: after libllama, as the CUDA build needs)

from llama_fastgen.evaluation.report import (commit, document_bench_args, document_bench_preamble, held_out_document,  # noqa: E402
                                             spread, write_results)

QUESTIONS = ["What is the first essay about? Answer in one sentence.",
             "Name one person the essays mention.",
             "What advice do the essays give to founders?"]
CONFIGS = {"full cache": ({"kv_overrides": dict(schema.STOCK_CACHE)}, None),
           "fastgen": ({}, None),
           "fastgen, checkpoints off": ({}, "0")}


def one_rep(gguf: str, kw: dict, doc: str, n_ctx: int, answer_tokens: int, questions: list[str]) -> dict:
    llm = Llama(model_path=gguf, n_ctx=n_ctx, verbose=False, **kw)
    try:
        times = []
        for i, q in enumerate(questions):
            msgs = [{"role": "user", "content": f"{doc}\n\n{q}"}]
            t0 = time.perf_counter()
            stream = llm.create_chat_completion(msgs, max_tokens=answer_tokens if i == 0 else 1,
                                                temperature=0.0, stream=True)
            next(stream)          # the role chunk comes first; the next one is the first token
            next(stream)
            times.append(time.perf_counter() - t0)
            for _ in stream:      # the first question's answer is generated in full
                pass
        cps = checkpoints.of(llm)
        return {"first": times[0], "later": times[1:], "restored": cps.restored if cps else 0,
                "checkpoint_bytes": cps.nbytes if cps else 0, "kv_bytes": llama_fastgen.native.cache_stats(llm)["kv_bytes"],
                "prompt_tokens": len(llm.tokenize(msgs[0]["content"].encode()))}
    finally:
        llm.close()


def main() -> int:
    ap, a = document_bench_args(__doc__, doc_tokens=4000, ctx=8192, reps=5, extra=lambda ap: ap.add_argument(
        "--answer-tokens", type=int, default=32, help="greedy tokens answering the first question"))
    if a.doc_tokens + 200 > a.ctx:
        ap.error(f"--doc-tokens {a.doc_tokens} does not fit --ctx {a.ctx} with a question and an answer")

    doc = held_out_document(a.gguf, a.doc_tokens)

    t_start, measured = time.time(), commit()   # the code that runs (edits during the run do not count)
    rows = []
    print(f"{a.gguf}: document {a.doc_tokens} tokens, n_ctx {a.ctx}, {a.reps} repetitions; seconds to the first token")
    print(f"  {'config':<26} {'question 1':>22} {'later questions':>22}  restored  KV MiB  checkpoints MiB")
    for name, (kw, env) in CONFIGS.items():
        if env is None:
            os.environ.pop(checkpoints.ENV, None)
        else:
            os.environ[checkpoints.ENV] = env
        reps = [one_rep(a.gguf, kw, doc, a.ctx, a.answer_tokens, QUESTIONS) for _ in range(a.reps)]
        row = {"config": name, "first": spread([r["first"] for r in reps]),
               "later": spread([t for r in reps for t in r["later"]]),
               "restored": [r["restored"] for r in reps], "prompt_tokens": reps[0]["prompt_tokens"],
               "kv_bytes": reps[0]["kv_bytes"], "checkpoint_bytes": max(r["checkpoint_bytes"] for r in reps)}
        rows.append(row)
        f, l = row["first"], row["later"]
        print(f"  {name:<26} {f['median']:7.2f} [{f['min']:.2f}, {f['max']:.2f}]   "
              f"{l['median']:7.2f} [{l['min']:.2f}, {l['max']:.2f}]   {sum(row['restored']):8d}  {row['kv_bytes'] / 2**20:6.1f}  "
              f"{row['checkpoint_bytes'] / 2**20:6.1f}", flush=True)
    os.environ.pop(checkpoints.ENV, None)
    if a.json:
        write_results(a.json, {"gguf": Path(a.gguf).name, "doc_tokens": a.doc_tokens, "n_ctx": a.ctx, "reps": a.reps,
                               "answer_tokens": a.answer_tokens, "questions": QUESTIONS, "rows": rows}, measured, t_start)
    return 0


def markdown(path: Path) -> str:
    """The table of a results JSON, for docs/RESULTS.md."""
    r = json.loads(path.read_text())
    lines = [document_bench_preamble(r), "",
             "| config | first question: s to first token | later question: s to first token | restored | KV MiB | checkpoints MiB (host) |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        f, l = row["first"], row["later"]
        lines.append(f"| {row['config']} | {f['median']:.2f} [{f['min']:.2f}, {f['max']:.2f}] | "
                     f"{l['median']:.2f} [{l['min']:.2f}, {l['max']:.2f}] | {sum(row['restored'])} of {l['n']} | "
                     f"{row.get('kv_bytes', 0) / 2**20:.1f} | {row.get('checkpoint_bytes', 0) / 2**20:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
