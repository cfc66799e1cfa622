#!/usr/bin/env python3
"""Host time of a decode step's class masks at depth: llama.cpp's fill over every cell against the update
from the last step's (llm_graph_input_attn_kv_fastgen::set_input_mask), as LLAMA_FASTGEN_TIMING=1 reports
them, and the decode speed around them. Each repetition is a fresh process (the timing prints at exit):
a prompt of each of --depths random tokens, then --steps decode steps; the first step fills, the others update
(as long as n_kv, padded by llama.cpp, does not grow: then the graph is rebuilt and the next step fills).

    python scripts/bench_masks.py --gguf M.gguf --depths 4096 16384 --json docs/results/masks-cpu.json
    python scripts/bench_masks.py --from-json docs/results/masks-cpu.json     # the markdown table
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import random, sys, time
import llama_fastgen
from llama_fastgen import native
from llama_cpp import Llama
depth, steps = int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=sys.argv[1], n_ctx=depth + steps + 256, n_batch=512, n_ubatch=512, verbose=False, flash_attn=True)
rng, n_vocab = random.Random(depth), llm.n_vocab()
llm.eval([rng.randrange(n_vocab) for _ in range(depth)])
t0 = time.perf_counter()
for _ in range(steps):
    llm.eval([rng.randrange(n_vocab)])
print("TOKS", steps/(time.perf_counter() - t0), native.cache_stats(llm)["masks"]["updated"], flush=True)
"""


def run(gguf: str, depth: int, steps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, gguf, str(depth), str(steps)], capture_output=True, text=True,
                       env={**os.environ, "LLAMA_FASTGEN_TIMING": "1"})
    from llama_fastgen.evaluation.report import mask_timing

    masks, toks = mask_timing(r.stderr), re.search(r"TOKS ([\d.]+) (\d+)", r.stdout)
    if r.returncode or not masks or not toks:
        sys.exit(f"the child failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
    return {**masks, "decode_tps": float(toks.group(1))}


def table(res: dict) -> str:
    rows = ["| depth (tokens) | fill, µs per step | update, µs per step | steps updated | decode tok/s |",
            "|---|---|---|---|---|"]
    for d in res["depths"]:
        s = d["summary"]
        f = lambda k, fmt="{:.1f}": f"{fmt.format(s[k]['median'])} [{fmt.format(s[k]['min'])}-{fmt.format(s[k]['max'])}]"
        rows.append(f"| {d['depth']} | {f('fill_us')} | {f('update_us')} | "
                    f"{d['runs'][0]['updated']} of {d['runs'][0]['updated'] + d['runs'][0]['filled']} | {f('decode_tps')} |")
    return "\n".join(rows) + f"\n\nmedian of {res['reps']} processes [min-max]; {res['gguf']}"


def main() -> int:
    from llama_fastgen.evaluation.report import commit, decode_bench_args, spread, write_results

    a = decode_bench_args(__doc__, steps=64, reps=3, table=table, extra=lambda ap: ap.add_argument(
        "--depths", type=int, nargs="+", default=[4096, 16384], help="prompt tokens before the decode steps"))
    if a is None:
        return 0

    t_start, measured = time.time(), commit()
    res = {"gguf": Path(a.gguf).name, "steps": a.steps, "reps": a.reps, "depths": []}
    for depth in a.depths:
        runs = [run(a.gguf, depth, a.steps) for _ in range(a.reps)]
        res["depths"].append({"depth": depth, "runs": runs,
                              "summary": {k: spread([r[k] for r in runs]) for k in ("fill_us", "update_us", "decode_tps")}})
        print(f"depth {depth}: fill {res['depths'][-1]['summary']['fill_us']['median']:.1f} us, "
              f"update {res['depths'][-1]['summary']['update_us']['median']:.1f} us per step", flush=True)
    print(table(res))
    if a.json:
        write_results(a.json, res, measured, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
