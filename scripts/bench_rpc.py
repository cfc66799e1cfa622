#!/usr/bin/env python3
"""Decode speed with every layer on one local llama.cpp RPC server (`llama-fastgen rpc-server`): a device
backend that the CPU dev machine has. Its client queues each input copy and each graph as a message without
a reply (only reads wait for the server), so it is a weak stand-in for a GPU, where each input copy is a
copy plus a stream sync. Compares the fastgen cache as shipped (its cache on the server: every fastgen input
of a ubatch a view of one graph input, copied to the server once; llama-graph-fastgen.cpp, input_blob) with
a graph input per fastgen input (LLAMA_FASTGEN_INPUT_COPY=0) and with the full cache of the same GGUF
(LLAMA_FASTGEN_DISABLE=1). Results files before session 43 name the configs "fastgen" (inputs apart) and
"fastgen one input".
Each repetition is a fresh client process: a warm-up, then a prompt of --depth tokens, then --steps
single-token decodes, each waiting for its logits as sampling would.

    python scripts/bench_rpc.py --gguf M.fastgen.gguf --json docs/results/rpc-inputs-smollm2-cpu.json
    python scripts/bench_rpc.py --from-json docs/results/rpc-inputs-smollm2-cpu.json     # the markdown table
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"fastgen": {"LLAMA_FASTGEN_DISABLE": "0", "LLAMA_FASTGEN_INPUT_COPY": ""},   # one input: the cache is on the server
           "fastgen inputs apart": {"LLAMA_FASTGEN_DISABLE": "0", "LLAMA_FASTGEN_INPUT_COPY": "0"},
           "full": {"LLAMA_FASTGEN_DISABLE": "1"}}

CHILD = """
import random, sys, time
import llama_fastgen
from llama_fastgen import rpc
import llama_cpp
from llama_cpp import Llama
gguf, endpoint, depth, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rpc.add_servers([endpoint])
llm = Llama(model_path=gguf, n_ctx=depth + steps + 256, n_batch=512, n_ubatch=512, n_gpu_layers=-1, verbose=False)
ctx, rng, n_vocab = llm._ctx.ctx, random.Random(depth), llm.n_vocab()
prompt, tokens = [rng.randrange(n_vocab) for _ in range(depth)], [rng.randrange(n_vocab) for _ in range(steps)]
llm.eval(prompt[:32])  # warm-up: the first graphs sent to the server, its buffers touched
llama_cpp.llama_synchronize(ctx)
llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
llm.reset()
t0 = time.perf_counter()
llm.eval(prompt)
llama_cpp.llama_synchronize(ctx)  # eval reads no logits here (logits_all off): the compute may still run
t1 = time.perf_counter()
for t in tokens:
    llm.eval([t])
    llama_cpp.llama_get_logits_ith(ctx, -1)  # waits for the step, as sampling its token would
print("TOKS", depth/(t1 - t0), steps/(time.perf_counter() - t1), flush=True)
"""


def run(gguf: str, endpoint: str, env: dict, depth: int, steps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, gguf, endpoint, str(depth), str(steps)], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=600)
    m = re.search(r"TOKS ([\d.]+) ([\d.]+)", r.stdout)
    if r.returncode or not m:
        sys.exit(f"the client failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
    return {"prefill_tps": float(m.group(1)), "decode_tps": float(m.group(2))}


def table(res: dict) -> str:
    rows = [f"| config | prefill tok/s ({res['depth']} tokens) | decode tok/s | decode / full |", "|---|---|---|---|"]
    full = res["configs"]["full"]["summary"]["decode_tps"]["median"]
    for name, c in res["configs"].items():
        s = c["summary"]
        f = lambda k: f"{s[k]['median']:.1f} [{s[k]['min']:.1f}-{s[k]['max']:.1f}]"
        rows.append(f"| {name} | {f('prefill_tps')} | {f('decode_tps')} | {s['decode_tps']['median'] / full:.2f}x |")
    return ("\n".join(rows) + f"\n\nmedian of {res['reps']} processes [min-max], taken in turn; {res['gguf']}, every layer "
            f"on one local RPC server (server threads: {res['server_threads']}), {res['steps']} decode steps")


def main() -> int:
    from llama_fastgen.evaluation.report import commit, decode_bench_args, spread, write_results

    def extra(ap):
        ap.add_argument("--depth", type=int, default=256, help="prompt tokens before the decode steps (default 256)")
        ap.add_argument("--server-threads", type=int, default=2, help="the RPC server's threads (default 2)")

    a = decode_bench_args(__doc__, steps=128, reps=5, table=table, extra=extra)
    if a is None:
        return 0

    t_start, measured = time.time(), commit()
    from llama_fastgen import rpc

    try:
        proc, endpoint = rpc.start_local(a.server_threads)
    except rpc.RpcError as e:
        sys.exit(str(e))
    runs = {name: [] for name in CONFIGS}
    try:
        for rep in range(a.reps):  # configs in turn, so that a slow spell of the machine hits each
            for name, env in CONFIGS.items():
                runs[name].append(run(a.gguf, endpoint, env, a.depth, a.steps))
                print(f"rep {rep + 1} {name}: decode {runs[name][-1]['decode_tps']:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = {"gguf": Path(a.gguf).name, "depth": a.depth, "steps": a.steps, "reps": a.reps, "server_threads": a.server_threads,
           "configs": {name: {"env": CONFIGS[name], "runs": r,
                              "summary": {k: spread([x[k] for x in r]) for k in ("prefill_tps", "decode_tps")}}
                       for name, r in runs.items()}}
    print(table(res))
    if a.json:
        write_results(a.json, res, measured, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
