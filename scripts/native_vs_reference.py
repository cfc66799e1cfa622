#!/usr/bin/env python3
"""The native cache against the PyTorch reference of the same eviction, on any model the converter
supports (the oracle tests/test_native.py applies to the default model in CI).

    python scripts/native_vs_reference.py --model qwen2.5-coder-0.5b \\
        --policies docs/results/qwen2.5-coder-0.5b-B0.30.fastgen.json --json docs/results/native-vs-reference-qwen.json

Converts the model with the given policy table (f32 weights, so that only the cache differs), feeds
--tokens tokens of the calibration texts in ubatches of 64, and compares per position:
  native fastgen vs reference fastgen  (the claim: the same keep-sets, up to f16-cache rounding)
  native full    vs reference full     (the precision floor of llama.cpp vs PyTorch on this model)
  native fastgen vs native full        (how far the eviction moves the output: must exceed the first)
from position 1 + the widest window or budget + 64, where every class has evicted. CPU only: the
reference (torch) and libllama share this process, which a CUDA build does not survive."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # before libllama (see llama_fastgen._lib)

REPO = Path(__file__).resolve().parent.parent


def agreement(a, b) -> dict:
    import numpy as np

    err = np.abs(a - b).max(-1)
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).mean()), "mean_abs": float(np.abs(a - b).mean()),
            "p99_max_abs": float(np.quantile(err, 0.99))}


def markdown(results: list[dict]) -> str:
    """A table for docs/RESULTS.md from result files (never typed by hand)."""
    out = ["| model | classes | KV at n_ctx | from position | pair | top-1 | mean abs diff | p99 of max abs diff |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for i, (pair, x) in enumerate(r["pairs"].items()):
            head = (f"{r['model']} | {', '.join(r['classes'])} | {r['kv_ratio']:.1%} of {r['n_ctx']} | {r['from_position']}"
                    if i == 0 else " | | |")
            out.append(f"| {head} | {pair} | {x['top1']:.1%} | {x['mean_abs']:.4f} | {x['p99_max_abs']:.3f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model prepare_model.py knows")
    ap.add_argument("--policies", type=Path, help="a converter report (.fastgen.json) whose policies to use")
    ap.add_argument("--tokens", type=int, default=1700, help="teacher-forced tokens (default 1700)")
    ap.add_argument("--workdir", type=Path, help="keep the converted GGUF here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--from-json", type=Path, nargs="+", help="only print a markdown table of these result files")
    a = ap.parse_args()
    if a.from_json:
        print(markdown([json.loads(p.read_text()) for p in a.from_json]))
        return 0

    if not a.policies:
        ap.error("--policies is required")
    from llama_fastgen.evaluation.report import command_line, commit as git_commit, machine
    from llama_fastgen import schema
    from llama_fastgen.converter import convert, reference
    from llama_fastgen.converter.calibration import load_texts
    from llama_fastgen.converter.profiling import token_context
    from llama_fastgen.logits import teacher_forced
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model_dir = Path(subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py"), "--model", a.model],
                                    capture_output=True, text=True, check=True).stdout.strip())
    work = a.workdir or Path(tempfile.mkdtemp(prefix="native-vs-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / f"{model_dir.name}-policies-f32.gguf"
    if not gguf.exists():
        rc = convert.main([str(model_dir), "--profile", "--policies", str(a.policies), "--outfile", str(gguf),
                           "--outtype", "f32", "--no-quality"])
        if rc:
            return rc
    meta = schema.read(gguf)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\n".join(t for _, t in load_texts()))["input_ids"][: a.tokens]
    n_ctx = 1 << (len(ids) - 1).bit_length()
    start = 1 + max(max(c.window, c.budget) for c in meta.at_context(n_ctx).classes) + 64
    if len(ids) - start < 200:
        ap.error(f"--tokens {a.tokens}: only {len(ids) - start} positions past the widest class ({start}); give more")

    nat, st = teacher_forced(gguf, ids, n_ctx=n_ctx, n_batch=64)
    nat_full, _ = teacher_forced(gguf, ids, n_ctx=n_ctx, n_batch=64, kv_overrides=dict(schema.STOCK_CACHE))
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ctx = token_context(ids, set(meta.special_token_ids), set(meta.punct_token_ids), meta.n_sink)
    ref = reference.logits(m, ids, meta.at_context(n_ctx).original_head_policies(), ctx, chunks=64).numpy()
    ref_full = reference.logits(m, ids, None, None).numpy()

    s = slice(start, None)
    rows = {"native vs reference, fastgen": agreement(nat[s], ref[s]),
            "native vs reference, full cache": agreement(nat_full[s], ref_full[s]),
            "native fastgen vs native full": agreement(nat[s], nat_full[s])}
    print(f"\n{model_dir.name}: {len(ids)} tokens, compared from position {start}, ubatch 64, "
          f"KV {st['kv_bytes'] / st['full_bytes']:.1%} of full at n_ctx {n_ctx}")
    print(f"  {'pair':34s} {'top-1':>7s} {'mean |d|':>9s} {'p99 max |d|':>12s}")
    for k, r in rows.items():
        print(f"  {k:34s} {r['top1']:7.1%} {r['mean_abs']:9.4f} {r['p99_max_abs']:12.3f}")
    if a.json:
        a.json.write_text(json.dumps({
            "model": model_dir.name, "policies": str(a.policies), "tokens": len(ids), "from_position": start,
            "n_ctx": n_ctx, "kv_ratio": st["kv_bytes"] / st["full_bytes"], "classes": [c.label for c in meta.classes],
            "pairs": rows, "command": command_line(["python", *sys.argv]), "commit": git_commit(), "machine": machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": round(time.time() - t0)},
            indent=1))
        print("wrote", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
