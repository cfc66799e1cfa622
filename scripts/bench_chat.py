#!/usr/bin/env python3
"""A chat workload as a new user runs it: --n chat completions, each over a different 2-3.5K-token
document (a slice of the pinned essays) and a question, --answer-tokens greedy tokens, through
llama-cpp-python's plain `Llama.create_chat_completion`. The fastgen cache and the full cache of the
same GGUF (fastgen.enable=false) are both loaded once and take the prompts in turn (the order
alternates), so drift of the machine hits both alike. Per completion: wall time, prompt and answer
tokens; in total: wall time and tokens/s, medians with min/max; and how far the two greedy answers
agree (characters before the first difference).

    python scripts/bench_chat.py --gguf out/chat/smollm2-T0.95.gguf --json docs/results/chat-smollm2-cpu.json
    python scripts/bench_chat.py --from-json docs/results/chat-smollm2-cpu.json     # its table, as markdown
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import llama_fastgen  # noqa: E402,F401  (before llama_cpp: our libllama)
from llama_fastgen import schema  # noqa: E402
from llama_cpp import Llama  # noqa: E402

from llama_fastgen.evaluation import tasks as eval_tasks  # noqa: E402
from llama_fastgen.evaluation.report import command_line, commit, machine, spread  # noqa: E402

QUESTIONS = ["Summarize the text above in two sentences.", "What is the main argument of the text above?",
             "Which people does the text above mention?", "What advice does the text above give?"]
CONFIGS = {"fastgen": {}, "full cache": {"kv_overrides": dict(schema.STOCK_CACHE)}}


def prompts(llm: Llama, n: int, lo: int, hi: int, seed: int) -> list[str]:
    ids = llm.tokenize(eval_tasks.essays()[0].encode(), add_bos=False)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        doc = llm.detokenize(ids[start:start + length]).decode("utf-8", "replace")
        out.append(f"{doc}\n\n{QUESTIONS[i % len(QUESTIONS)]}")
    return out


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def markdown(res: dict) -> str:
    a = res["args"]
    s = res["summary"]
    agree = spread([common_prefix(x["answer"], y["answer"]) for x, y in zip(res["runs"]["fastgen"], res["runs"]["full cache"])])
    out = [f"{Path(a['gguf']).name}, {a['n']} chat completions per configuration, {a['min_tokens']}-{a['max_tokens']}-token "
           f"prompts, {a['answer_tokens']} answer tokens, n_ctx {a['n_ctx']}; {res['machine']['cpu']} ({res['machine']['cores']} "
           f"cores), commit `{res['commit'][:12]}{'+dirty' if res['commit'].endswith('+dirty') else ''}`, {res['started']}; `{res['command']}`", "",
           "| config | total s | s per completion | tokens/s (prompt + answer) |", "|---|---|---|---|"]
    for name, r in s.items():
        m, t = r["seconds_per_completion"], r["tokens_per_second"]
        out.append(f"| {name} | {r['total_seconds']:.1f} | {m['median']:.2f} [{m['min']:.2f}, {m['max']:.2f}] | "
                   f"{t['median']:.0f} [{t['min']:.0f}, {t['max']:.0f}] |")
    out += ["", f"fastgen / full cache total time {s['fastgen']['total_seconds'] / s['full cache']['total_seconds']:.2f}x; "
                f"identical answers {res['identical_answers']} of {agree['n']}; the two greedy answers agree on the first "
                f"{agree['median']:.0f} characters (median; min {agree['min']}, max {agree['max']})"]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="a fastgen GGUF (its full cache is the baseline)")
    ap.add_argument("--from-json", type=Path, help="print the markdown table of this results file and stop")
    ap.add_argument("--n", type=int, default=80, help="completions per configuration (default 80)")
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=3500)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text())))
        return 0
    if not args.gguf:
        ap.error("--gguf is needed (or --from-json)")

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    llms = {name: Llama(model_path=args.gguf, n_ctx=args.n_ctx, verbose=False, **kw) for name, kw in CONFIGS.items()}
    try:
        ps = prompts(llms["full cache"], args.n, args.min_tokens, args.max_tokens, args.seed)
        runs = {name: [] for name in CONFIGS}
        for i, p in enumerate(ps):
            order = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                t0 = time.perf_counter()
                r = llms[name].create_chat_completion([{"role": "user", "content": p}], max_tokens=args.answer_tokens,
                                                      temperature=0.0)
                dt = time.perf_counter() - t0
                u = r["usage"]
                runs[name].append({"seconds": dt, "prompt_tokens": u["prompt_tokens"],
                                   "completion_tokens": u["completion_tokens"], "answer": r["choices"][0]["message"]["content"]})
            print(f"  {i + 1}/{len(ps)}: " + "  ".join(f"{n} {runs[n][-1]['seconds']:.2f} s" for n in CONFIGS), flush=True)
    finally:
        for llm in llms.values():
            llm.close()

    summary = {}
    for name, rs in runs.items():
        total = sum(r["seconds"] for r in rs)
        summary[name] = {"completions": len(rs), "total_seconds": total,
                         "seconds_per_completion": spread([r["seconds"] for r in rs]),
                         "tokens_per_second": spread([(r["prompt_tokens"] + r["completion_tokens"]) / r["seconds"] for r in rs])}
    same = sum(a["answer"] == b["answer"] for a, b in zip(runs["fastgen"], runs["full cache"]))
    print(f"{args.n} chat completions, {args.min_tokens}-{args.max_tokens}-token prompts, {args.answer_tokens} answer tokens")
    for name, s in summary.items():
        m = s["seconds_per_completion"]
        print(f"  {name:11s} total {s['total_seconds']:7.1f} s   per completion {m['median']:.2f} s [{m['min']:.2f}, {m['max']:.2f}]")
    print(f"  fastgen / full cache total time: {summary['fastgen']['total_seconds'] / summary['full cache']['total_seconds']:.2f}x;"
          f" identical answers: {same}/{len(ps)}")
    if args.json:
        out = {"command": command_line(sys.argv), "commit": commit(), "machine": machine(), "started": started,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
               "summary": summary, "identical_answers": same, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
