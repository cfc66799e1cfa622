#!/usr/bin/env python3
"""GPU checks and benchmarks of the fastgen cache (run by scripts/gpu_run.sh on the GPU machine).

  correctness  random-weight small models, same tokens on CPU (nothing offloaded) and on CUDA:
               fastgen logits CPU vs CUDA, and the stock full cache CPU vs CUDA as the noise floor;
               in ubatches of 64 (GGML_OP_FASTGEN_HH_ATTN's prefill kernels) and then one token per
               decode (its decode kernel), plus the fused op vs the composed ggml path on CUDA in both
  sequences    three sequences decoded together (a heavy-hitter store each, ubatches split by sequence:
               one op per sequence on views of the ubatch) against each alone in ubatches of its share,
               on CUDA, and CUDA against the CPU; per-sequence and unified layouts
  rollback     tail rollback (kv override fastgen.undo_tokens): steps of right and wrong tokens, the
               wrong ones removed again, against a cache that evaluated the right ones only
               (llama_fastgen.logits.with_rolled_back_tails), on CUDA and on the CPU, and CUDA vs CPU
  kv           KV bytes allocated at several n_ctx: fastgen, full f16, full q8_0 (C API)
  reuse        decode 64 tokens through llama-cpp-python: tokens/s and how many graphs llama.cpp
               reused (a rebuilt graph costs host time and CUDA graph captures), fastgen vs full
  speed        llama-bench decode tokens/s at depths and prefill tokens/s (median of --reps, min-max):
               fastgen (fused op), fastgen with the composed ggml path (LLAMA_FASTGEN_HH_FUSED=0), the
               same mix with its heavy-hitter heads full (--model-nohh), full f16, q8_0; and the ideal
               decode speed of our bytes: full-cache time at depth 0 + (our KV bytes / full KV bytes)
               x (full-cache time at that depth - at depth 0)
  host         the host time the fastgen cache adds per ubatch at each of --depths (LLAMA_FASTGEN_TIMING=1,
               one llama-bench tg64 run each): the heavy-hitter stores' phases, and the decode steps' class
               masks filled over every cell or updated from the last step's

Prints tables and writes JSON (--json). Numbers are measured, never typed in.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# llama_fastgen (libllama + ggml-cuda) before numpy: on the GPU machine, loading numpy first made
# libllama resolve libstdc++ template symbols into libggml-cuda and crash in llama.cpp's print_info
from llama_fastgen import llama_cpp  # noqa: F401,E402  (importing llama_fastgen alone no longer loads libllama)
from llama_fastgen import schema  # noqa: E402
from llama_fastgen.evaluation.report import command_line  # noqa: E402
import numpy as np  # noqa: E402


def logits(gguf: str, ids: list[int], gpu: bool, fastgen: bool, decode_from=None, n_batch: int = 64) -> np.ndarray:
    from llama_fastgen.logits import teacher_forced

    # CPU: no layer, no KV and no op offloaded, in the same CUDA build (hiding the GPU with
    # CUDA_VISIBLE_DEVICES="" made this build crash at load). verbose=True: on the GPU machine's
    # CUDA build, llama-cpp-python's stdout/stderr redirection crashed in llama.cpp's print_info.
    return teacher_forced(gguf, ids, n_ctx=max(2048, len(ids)), n_batch=n_batch, decode_from=decode_from, verbose=True, flash_attn=True,
                          n_gpu_layers=99 if gpu else 0, offload_kqv=gpu, op_offload=gpu,
                          kv_overrides=None if fastgen else dict(schema.STOCK_CACHE))[0]


def child(args) -> int:
    ids = [int(i) for i in np.random.default_rng(1).integers(100, 100000, args.n_tokens)]
    np.save(args.save, logits(args.model, ids, args.gpu, args.fastgen, decode_from=args.decode_from,
                              n_batch=args.batch).astype(np.float16))
    return 0


def run_child(model, n, gpu, fastgen, path, decode_from=None, env_extra=None, batch=64):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, __file__, "child", "--model", model, "--n-tokens", str(n), "--save", path, "--batch", str(batch)]
    cmd += ["--gpu"] if gpu else []
    cmd += ["--fastgen"] if fastgen else []
    cmd += ["--decode-from", str(decode_from)] if decode_from is not None else []
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return np.load(path).astype(np.float32)


def compare(a, b, s):
    d = np.abs(a[s:] - b[s:])
    return {"positions": int(len(d)), "top1_agreement": float((a[s:].argmax(-1) == b[s:].argmax(-1)).mean()),
            "max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_rel": float(d.max() / np.abs(a[s:]).max())}


def correctness(args) -> dict:
    """Positions compared: from 600 (past every window of the policy mix) in ubatches of --batch
    (default 64: many small blocks, the prefill kernels split the cells; 2048: the (row tile, head)
    blocks fill the GPU, no split); the last 400, decoded one token at a time after a prefill, in
    decode mode; and a young cache, the first 300 tokens decoded one at a time from
    position 1 (the decode kernel's one-chunk path while at most 64 cells are used, then a few chunks). --modes picks
    some of the three (ubatch, decode, young)."""
    res = {}
    n, b = args.n_tokens, args.batch
    for small in args.small:
        name = os.path.basename(small)
        modes = {"ubatch": (f"ubatch{b}", n, None, 600), "decode": ("decode", n, n - 400, n - 400),
                 "young": ("young decode", min(n, 300), 1, 1)}
        for mode, nt, dec, s in (modes[m] for m in args.modes):
            for fg in (True, False):
                cpu = run_child(small, nt, False, fg, "/tmp/cpu.npy", dec, batch=b)
                gpu = run_child(small, nt, True, fg, "/tmp/gpu.npy", dec, batch=b)
                res[f"{name} {mode} {'fastgen' if fg else 'full'} CPU vs CUDA"] = compare(cpu, gpu, s)
                if fg:
                    composed = run_child(small, nt, True, True, "/tmp/gpu0.npy", dec, {"LLAMA_FASTGEN_HH_FUSED": "0"}, batch=b)
                    res[f"{name} {mode} fastgen CUDA composed vs fused"] = compare(composed, gpu, s)
                    for kv in args.also_env: # CUDA with a switch set against CUDA as shipped
                        other = run_child(small, nt, True, True, "/tmp/gpu1.npy", dec, dict([kv.split("=", 1)]), batch=b)
                        res[f"{name} {mode} fastgen CUDA {kv} vs default"] = compare(other, gpu, s)
    print("CPU vs CUDA (random-weight small models, %d tokens)" % n)
    for k, v in res.items():
        print(f"  {k:52s} top-1 {v['top1_agreement']:.4f}  max|diff| {v['max_abs']:.4f}  mean|diff| {v['mean_abs']:.5f}  max rel {v['max_rel']:.2e}", flush=True)
    return res


def correctness_table(res: dict) -> str:
    """the correctness step's comparisons as markdown"""
    out = ["| logits compared | positions | top-1 agreement | max rel | mean abs diff |", "|---|---|---|---|---|"]
    out += [f"| {k} | {v['positions']} | {v['top1_agreement']:.4f} | {v['max_rel']:.2e} | {v['mean_abs']:.5f} |"
            for k, v in res.items()]
    return "\n".join(out)


SEQ_N, SEQ_PREFILL = 900, 800  # past the small models' heavy-hitter budgets at n_ctx 4096


def seq_child(args) -> int:
    from llama_fastgen.logits import several_sequences

    rng = np.random.default_rng(2)
    streams = [[int(t) for t in rng.integers(100, 40000, SEQ_N)] for _ in range(args.n_seq)]
    out = several_sequences(args.model, streams[: args.n_seq], SEQ_PREFILL, args.unified, args.ubatch, n_ctx=4096,
                            n_gpu_layers=99 if args.gpu else 0)
    np.save(args.save, np.stack(out).astype(np.float32))
    return 0


def sequences(args) -> dict:
    """per model and layout: CUDA joint vs CUDA alone (each stream alone, the same ubatches per
    stream), CPU joint vs CUDA joint"""
    res = {}

    def run(model, n_seq, ubatch, unified, gpu, stream=None):
        cmd = [sys.executable, __file__, "seqchild", "--model", model, "--n-seq", str(n_seq), "--ubatch", str(ubatch),
               "--save", "/tmp/seq.npy"] + (["--gpu"] if gpu else []) + (["--unified"] if unified else [])
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return np.load("/tmp/seq.npy")

    for small in args.small:
        name = os.path.basename(small)
        for unified in (False, True):
            lay = "unified" if unified else "per-sequence"
            joint = run(small, 3, 48, unified, True)    # 16 tokens of each sequence per ubatch
            alone = run(small, 1, 16, unified, True)    # the first stream alone, ubatches of 16
            cpu = run(small, 3, 48, unified, False)
            res[f"{name} {lay} 3 sequences CUDA: joint vs alone (stream 0)"] = compare(alone[0], joint[0], 0)
            res[f"{name} {lay} 3 sequences joint: CPU vs CUDA"] = compare(cpu.reshape(-1, cpu.shape[-1]),
                                                                          joint.reshape(-1, joint.shape[-1]), 0)
    print("several sequences (random-weight small models, %d tokens, the last %d decoded)" % (SEQ_N, SEQ_N - SEQ_PREFILL))
    for k, v in res.items():
        print(f"  {k:64s} top-1 {v['top1_agreement']:.4f}  max rel {v['max_rel']:.2e}  mean|diff| {v['mean_abs']:.5f}", flush=True)
    return res


RB_PREFILL, RB_ACCEPTED = 1000, 400  # past the small models' heavy-hitter budgets at n_ctx 2048


def rb_child(args) -> int:
    from llama_fastgen.logits import with_rolled_back_tails

    ids = [int(i) for i in np.random.default_rng(3).integers(100, 40000, RB_PREFILL + RB_ACCEPTED)]
    got, want, rolled, refused = with_rolled_back_tails(
        args.model, ids, RB_PREFILL, RB_ACCEPTED, n_ctx=2048, verbose=True, flash_attn=True,
        n_gpu_layers=99 if args.gpu else 0, offload_kqv=args.gpu, op_offload=args.gpu,
        kv_overrides={schema.KEYS["UNDO_TOKENS"]: 16})
    np.savez(args.save, got=got, want=want, counts=np.array([rolled, refused]))
    return 0


def rollback(args) -> dict:
    res = {}
    for small in args.small:
        name, out = os.path.basename(small), {}
        for gpu in (True, False):
            cmd = [sys.executable, __file__, "rbchild", "--model", small, "--save", "/tmp/rb.npz"] + (["--gpu"] if gpu else [])
            r = subprocess.run(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            if r.returncode:
                sys.exit(f"rbchild {'CUDA' if gpu else 'CPU'} on {small} failed ({r.returncode}):\n{r.stderr[-4000:]}")
            out[gpu] = dict(np.load("/tmp/rb.npz"))
            dev = "CUDA" if gpu else "CPU"
            rolled, refused = (int(x) for x in out[gpu]["counts"])
            res[f"{name} {dev}: rolled back vs never evaluated ({rolled} steps rolled back, {refused} refused)"] = \
                compare(out[gpu]["want"], out[gpu]["got"], 0)
        res[f"{name} rolled back: CPU vs CUDA"] = compare(out[False]["got"], out[True]["got"], 0)
        res[f"{name} never evaluated: CPU vs CUDA"] = compare(out[False]["want"], out[True]["want"], 0)
    print("tail rollback (random-weight small models, %d-token prefill, %d right tokens)" % (RB_PREFILL, RB_ACCEPTED))
    for k, v in res.items():
        print(f"  {k:80s} top-1 {v['top1_agreement']:.4f}  max rel {v['max_rel']:.2e}  mean|diff| {v['mean_abs']:.5f}", flush=True)
    return res


def kv(args) -> list:
    import llama_fastgen
    from llama_cpp import Llama

    rows = []
    for n_ctx in args.kv_ctx:
        for name, kw in (("fastgen f16", {}), ("full f16", {"kv_overrides": dict(schema.STOCK_CACHE)}),
                         ("full q8_0", {"kv_overrides": dict(schema.STOCK_CACHE), "type_k": 8, "type_v": 8})):
            llm = Llama(model_path=args.model, n_ctx=n_ctx, n_gpu_layers=99, flash_attn=True, verbose=True, **kw)
            st = llama_fastgen.native.cache_stats(llm)
            llm.close()
            rows.append({"config": name, "n_ctx": n_ctx, "kv_bytes": st["kv_bytes"], "full_f16_bytes": st["full_bytes"],
                         "kv_bytes_by_buffer": st["kv_bytes_by_buffer"]})
    full = {r["n_ctx"]: r["kv_bytes"] for r in rows if r["config"] == "full f16"}
    print("KV bytes allocated (8B shape)")
    for r in rows:
        where = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in r["kv_bytes_by_buffer"].items())
        print(f"  n_ctx {r['n_ctx']:>6} {r['config']:12s} {r['kv_bytes'] / 2**30:7.3f} GiB  ({r['kv_bytes'] / full[r['n_ctx']]:.1%} of full f16; {where})")
    return rows


def reuse(args) -> list:
    import llama_cpp

    rows = []
    for name, kw in (("fastgen f16", {}), ("full f16", {"kv_overrides": dict(schema.STOCK_CACHE)})):
        llm = llama_cpp.Llama(model_path=args.model, n_ctx=4096, n_gpu_layers=99, flash_attn=True, verbose=True, **kw)
        llm.eval([1] * 16)
        t0 = time.time()
        for i in range(64):
            llm.eval([100 + i])
        dt = time.time() - t0
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        rows.append({"config": name, "tokens": 64, "tps": 64 / dt, "graphs_reused": perf.n_reused, "n_eval": perf.n_eval})
        llm.close()
    print("decode through llama-cpp-python (8B shape), 64 tokens after 16")
    for r in rows:
        print(f"  {r['config']:12s} {r['tps']:7.1f} t/s  graphs reused {r['graphs_reused']} of {r['n_eval']} evals", flush=True)
    return rows


def bench(bin_, model, extra, env_extra, reps) -> list:
    env = dict(os.environ, **env_extra)
    cmd = [bin_, "-m", model, "-ngl", "99", "-fa", "1", "-o", "json", "-r", str(reps)] + extra
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out)


def row(name, test, r) -> dict:
    """llama-bench's per-repetition tokens/s as median [min, max]"""
    ts = r.get("samples_ts") or [r["avg_ts"]]
    return {"config": name, "test": test, "depth": r["n_depth"], "reps": len(ts), "tps": float(np.median(ts)),
            "tps_min": float(min(ts)), "tps_max": float(max(ts)), "stddev": r["stddev_ts"]}


def kv_ratio(model: str, n_ctx: int) -> float:
    """fastgen KV bytes / full f16 KV bytes at n_ctx (C API), all layers on the GPU"""
    import llama_fastgen
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_gpu_layers=99, flash_attn=True, verbose=True)
    try:
        st = llama_fastgen.native.cache_stats(llm)
    finally:
        llm.close()
    return st["kv_bytes"] / st["full_bytes"]


def ideal(rows, model, n_gen=64) -> list:
    """The decode speed the fastgen cache's bytes allow at each depth, from the full cache's own times:
    t(0) + (our KV bytes / full KV bytes at that n_ctx) x (t(d) - t(0)), t = 1 / median tokens/s"""
    full = {r["depth"]: r["tps"] for r in rows if r["config"] == "full f16" and r["test"] == "tg64"}
    out = []
    for d in sorted(full):
        if d == 0 or 0 not in full:
            continue
        ratio = kv_ratio(model, d + n_gen)  # llama-bench's n_ctx: depth + n_gen
        t = 1 / full[0] + ratio * (1 / full[d] - 1 / full[0])
        out.append({"config": "ideal (bytes)", "test": "tg64", "depth": d, "tps": 1 / t, "kv_ratio": ratio})
    return out


def speed_configs(args) -> list:
    """(name, GGUF, llama-bench arguments, environment) of every speed config; --configs picks among them"""
    configs = [("fastgen f16", args.model, [], {}),
               ("fastgen composed", args.model, [], {"LLAMA_FASTGEN_HH_FUSED": "0"}),
               ("fastgen hh->full", args.model_nohh, [], {}),
               ("full f16", args.model, [], {"LLAMA_FASTGEN_DISABLE": "1"}),
               ("full q8_0", args.model, ["-ctk", "q8_0", "-ctv", "q8_0"], {"LLAMA_FASTGEN_DISABLE": "1"}),
               # diagnostics, only when named in --configs: a mixed layer's two attentions on one stream
               # (ggml-fastgen-streams.cu: two by default in decode), and without CUDA graphs
               ("diag fastgen one-stream", args.model, [], {"LLAMA_FASTGEN_CUDA_STREAMS": "0"}),
               # hh_attn launched without programmatic dependent launch (the rest of llama.cpp keeps it)
               ("diag fastgen no-pdl", args.model, [], {"LLAMA_FASTGEN_CUDA_PDL": "0"}),
               # hh_attn's new-token K row loaded and stored interleaved, as before session 40 (not the old kernel itself:
               # V's loads stay first, and one compiled kernel holds both paths, with the larger one's registers)
               ("diag fastgen no-kbatch", args.model, [], {"LLAMA_FASTGEN_CUDA_KBATCH": "0"}),
               # a mixed layer's heavy-hitter op on a side stream too, not on the main one (before session 40)
               ("diag fastgen hh-side", args.model, [], {"LLAMA_FASTGEN_CUDA_HH_MAIN": "0"}),
               # the classes' flash attention on llama.cpp's own kernel choice (the vector kernel in decode), not MMA
               ("diag fastgen fa-vec", args.model, [], {"LLAMA_FASTGEN_CUDA_FA_MMA": "0"}),
               # a mixed layer's K and V rows in two launches and its concat launched (ggml-fastgen-fuse.cu: neither)
               ("diag fastgen no-fuse", args.model, [], {"LLAMA_FASTGEN_CUDA_FUSE": "0"}),
               # a graph input each that the scheduler copies to the device on its own, not every fastgen input a view
               # of one graph input's device copy (llama-graph-fastgen.cpp; the default where the cache is on the device)
               ("diag fastgen inputs-apart", args.model, [], {"LLAMA_FASTGEN_INPUT_COPY": "0"}),
               ("diag fastgen no-graphs", args.model, [], {"GGML_CUDA_DISABLE_GRAPHS": "1"}),
               ("diag full no-graphs", args.model, [], {"LLAMA_FASTGEN_DISABLE": "1", "GGML_CUDA_DISABLE_GRAPHS": "1"})]
    unknown = set(args.configs or []) - {c[0] for c in configs}
    if unknown:
        raise SystemExit(f"bench_gpu.py speed: no config named {', '.join(sorted(unknown))}; the configs are: "
                         + ", ".join(repr(c[0]) for c in configs))
    return [c for c in configs if c[1] and (c[0] in args.configs if args.configs else not c[0].startswith("diag"))]


def speed(args) -> list:
    configs = speed_configs(args)
    rows = []
    depths = ",".join(str(d) for d in args.depths)
    for name, model, extra, env in configs:
        t0 = time.time()
        for r in bench(args.llama_bench, model, ["-p", "0", "-n", "64", "-d", depths] + extra, env, args.reps):
            rows.append(row(name, "tg64", r))
            print(f"  {name}: tg64 @ d{r['n_depth']} {rows[-1]['tps']:.1f} t/s", flush=True)
        for r in bench(args.llama_bench, model, ["-p", "8192", "-n", "0"] + extra, env, args.reps) if args.prefill else []:
            rows.append(row(name, "pp8192", r))
        print(f"  ({name}: {time.time() - t0:.0f} s)", flush=True)
    if any(c[0] == "full f16" for c in configs):
        rows += ideal(rows, args.model)
    print(speed_table(rows))
    return rows


def host(args) -> list:
    """Host time the fastgen cache adds per ubatch at each depth, as LLAMA_FASTGEN_TIMING=1 prints it at exit
    (one llama-bench tg64 run per depth): the heavy-hitter stores' phases and the decode steps' class masks,
    filled over every cell (the first step, and where n_kv grows) or updated from the last step's (the others)."""
    if not args.model:
        sys.exit("host: --model (a fastgen GGUF) is needed")
    from llama_fastgen.evaluation.report import mask_timing

    out = []
    for d in args.depths:
        r = subprocess.run([args.llama_bench, "-m", args.model, "-ngl", "99", "-fa", "1", "-p", "0", "-n", "64", "-d", str(d),
                            "-r", "1", "--no-warmup"], env=dict(os.environ, LLAMA_FASTGEN_TIMING="1"), capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"host: llama-bench failed at depth {d} (rc {r.returncode}):\n{r.stderr[-2000:]}")
        lines = [l for l in r.stderr.splitlines() if l.startswith("fastgen timing:")]
        out.append({"depth": d, "lines": lines, **(mask_timing(r.stderr) or {})})
        print(f"  host @ d{d}: " + (" | ".join(lines) or f"no timing lines (rc {r.returncode})"), flush=True)
    return out


def speed_table(rows, markdown: bool = False) -> str:
    """tokens/s per test and config (median [min-max] where repeated), fastgen / full and / ideal"""
    names = list(dict.fromkeys(r["config"] for r in rows))
    reps = max((r.get("reps", 1) for r in rows), default=1)
    tests = sorted({(r["test"], r["depth"]) for r in rows}, key=lambda t: (t[0] != "tg64", t[1]))
    head = ["test"] + names + ["fastgen / full", "fastgen / ideal"]
    lines = []
    for t in tests:
        got = {r["config"]: r for r in rows if (r["test"], r["depth"]) == t}
        cells = [f"{got[c]['tps']:.1f} [{got[c]['tps_min']:.0f}-{got[c]['tps_max']:.0f}]" if c in got and "tps_min" in got[c]
                 else f"{got[c]['tps']:.1f}" if c in got else "-" for c in names]
        fg, full, best = (got.get(c, {}).get("tps", float("nan")) for c in ("fastgen f16", "full f16", "ideal (bytes)"))
        lines.append([f"{t[0]} @ d{t[1]}"] + cells + [f"{fg / full:.2f}x", f"{fg / best:.2f}x" if best == best else "-"])
    title = f"llama-bench tokens/s (8B shape, Q4_0 random weights, FA on), median of {reps} [min-max]"
    if markdown:
        return "\n".join([title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(x) + " |" for x in lines])
    return "\n".join([title] + ["  " + "".join(f"{x:>22}" for x in line) for line in [head] + lines])


def run_info() -> dict:
    """what a GPU results file says about its run: machine, command, commit, start time"""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu = "no GPU"
    # the device tool's copy of the tree carries the .git of the session's start, not its last commit:
    # LLAMA_FASTGEN_COMMIT (set by the caller) wins over git there
    commit = os.environ.get("LLAMA_FASTGEN_COMMIT", "")
    try:
        if not commit:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
            commit += "+dirty" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                 capture_output=True, text=True).stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    # switches exported for the whole run change what every config runs: command_line names them
    return {"machine": gpu, "command": command_line([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "commit": commit,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", "correctness", "sequences", "rollback", "kv", "reuse", "speed", "host", "table", "child",
                                     "seqchild", "rbchild"])
    ap.add_argument("--model", help="8B-shape fastgen GGUF (kv, speed)")
    ap.add_argument("--small", nargs="+", default=[], help="small random fastgen GGUFs (correctness)")
    ap.add_argument("--model-nohh", help="the --model mix with its frequent heads full (speed baseline)")
    ap.add_argument("--llama-bench", default="llama-bench")
    ap.add_argument("--n-tokens", type=int, default=1600)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 8192, 32768, 65536])
    ap.add_argument("--kv-ctx", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--fastgen", action="store_true")
    ap.add_argument("--save")
    ap.add_argument("--decode-from", type=int)
    ap.add_argument("--n-seq", type=int, default=3)
    ap.add_argument("--ubatch", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64, help="correctness: ubatch size of the prefill comparison")
    ap.add_argument("--also-env", nargs="+", default=[], metavar="VAR=VALUE",
                    help="correctness: also compare fastgen on CUDA with each of these set against CUDA as shipped")
    ap.add_argument("--modes", nargs="+", choices=["ubatch", "decode", "young"], default=["ubatch", "decode", "young"],
                    help="correctness: which comparisons (default all three; 'ubatch' alone is the prefill comparison)")
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--no-prefill", dest="prefill", action="store_false", help="speed: decode only")
    ap.add_argument("--configs", nargs="+", help="speed: only these configs (names as printed)")
    ap.add_argument("--reps", type=int, default=5, help="speed: llama-bench repetitions (default 5)")
    ap.add_argument("--from-json", help="table: print the correctness and speed tables of this results file as markdown")
    args = ap.parse_args()
    if args.what == "child":
        return child(args)
    if args.what == "seqchild":
        return seq_child(args)
    if args.what == "rbchild":
        return rb_child(args)
    if args.what == "table":
        res = json.load(open(args.from_json))
        for step in ("correctness", "sequences", "rollback"):
            if step in res:
                print(correctness_table(res[step]))
        if "speed" in res:
            print(speed_table(res["speed"], markdown=True))
        for h in res.get("host", []):
            print(f"- depth {h['depth']}: " + "; ".join(l.removeprefix("fastgen timing: ") for l in h["lines"]))
        return 0
    out = run_info()
    for step in ("correctness", "sequences", "rollback", "kv", "reuse", "speed", "host"):
        if args.what in (step, "all"):
            out[step] = globals()[step](args)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
