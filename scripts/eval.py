#!/usr/bin/env python3
"""Quality and memory of fastgen against the full cache and baselines, through the native cache.

For one HF model directory (default: the bundled SmolLM2-135M-Instruct) this profiles and
converts at each threshold, builds a uniform baseline GGUF at about the same KV bytes, and runs
every configuration on the same held-out text (Python's own documentation, `pydoc_data.topics`,
which ships with every Python and is not in the calibration set):

  full f16 (reference) | fastgen T | uniform special+punct+local(w) at equal bytes | full q8_0 | fastgen + q8_0

Quality is teacher-forced: the text goes through the compressed native cache in ubatches of 64
(strict semantics: the same keys as token-by-token decoding) and each position's next-token
distribution is compared with the full cache: KL(full || config), top-1 agreement, perplexity.
Memory is what the context allocates (C API). Prints a table, writes JSON (and a PNG with --plot).

    python scripts/eval.py --quick --json eval.json
Not yet here (issue 6): passkey / needle grids, H2O baselines, decode-speed sweeps on CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
Q8_0 = 8  # ggml type id


def held_out_text(n_chars: int = 40000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def run_config(gguf: Path, ids: list[int], n_ctx: int, fastgen: bool, kv_q8: bool) -> tuple[np.ndarray, dict]:
    from llama_fastgen.logits import teacher_forced

    kw = {} if fastgen else {"kv_overrides": {"fastgen.enable": False}}
    if kv_q8:
        kw.update(type_k=Q8_0, type_v=Q8_0)
    return teacher_forced(gguf, ids, n_ctx=n_ctx, n_batch=64, flash_attn=True, **kw)


def compare(full: np.ndarray, other: np.ndarray, ids: list[int], start: int) -> dict:
    def logp(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = logp(full[start:-1]), logp(other[start:-1])
    nxt = np.array(ids[start + 1:])
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
            "top1": float((p.argmax(-1) == q.argmax(-1)).mean()),
            "ppl": float(np.exp(-q[np.arange(len(nxt)), nxt].mean())), "positions": int(len(nxt))}


def uniform_gguf(model_dir: Path, window: int, protected_frac: float, out: Path) -> Path:
    """Every KV head on special+punct+local(window): the FastGen local rung applied uniformly."""
    from transformers import AutoConfig, AutoTokenizer

    from llama_fastgen import schema
    from llama_fastgen.converter import gguf_export, tokens
    from llama_fastgen.converter.architectures import shape

    n_layer, _, n_kv, _ = shape(AutoConfig.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta = schema.FastgenMetadata(
        threshold=0.0, n_sink=4, classes=[schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, window)],
        layer_class_heads=[[n_kv]] * n_layer, head_perm=[list(range(n_kv))] * n_layer,
        special_token_ids=tokens.special_ids(tok), punct_token_ids=tokens.punct_ids(tok),
        protected_frac=protected_frac, calibration={"uniform_baseline": True})
    return gguf_export.convert(model_dir, out, "f32", extra_kv=meta.to_kv())


def equal_bytes_window(meta, target: int, head_dim: int, n_ctx: int, n_kv_total: int) -> int:
    """Largest power-of-two window whose uniform cache does not exceed `target` bytes (16 at least)."""
    from llama_fastgen import schema

    best = 16
    for w in (2 ** k for k in range(4, 16)):
        m = schema.FastgenMetadata(threshold=0, n_sink=4, classes=[schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, w)],
                                   layer_class_heads=[[n_kv_total]], head_perm=[[0]], special_token_ids=[],
                                   punct_token_ids=[], protected_frac=meta.protected_frac)
        if schema.kv_bytes(m, head_dim, n_ctx, 64)[0] <= target:
            best = w
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="HF model directory (default: the bundled model)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.91, 0.95, 0.98])
    ap.add_argument("--quick", action="store_true", help="T = 0.95 only, 1,200 tokens (a few minutes on 2 cores)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, help="keep GGUFs here (default: a temporary folder)")
    a = ap.parse_args()
    if a.quick:
        a.thresholds, a.tokens = [0.95], 1200
    model_dir = a.model_dir or Path(subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py")],
                                                   capture_output=True, text=True, check=True).stdout.strip())
    from transformers import AutoConfig, AutoTokenizer

    from llama_fastgen import schema
    from llama_fastgen.converter import convert
    from llama_fastgen.converter.architectures import shape

    n_layer, _, n_kv, head_dim = shape(AutoConfig.from_pretrained(model_dir))
    ids = AutoTokenizer.from_pretrained(model_dir)(held_out_text())["input_ids"][: a.tokens]
    n_ctx = 1 << (len(ids) - 1).bit_length()
    start = min(600, len(ids) // 2)  # score positions past most windows
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fastgen-eval-"))
    work.mkdir(parents=True, exist_ok=True)

    rows, ggufs = [], {}
    for t in a.thresholds:
        g = work / f"fastgen-T{t}.gguf"
        if not g.exists():
            assert convert.main([str(model_dir), "--profile", "--outfile", str(g), "--outtype", "f32",
                                 "--threshold", str(t), "--no-quality"]) == 0
        ggufs[t] = g
    ref_gguf = ggufs[a.thresholds[0]]
    full, st_full = run_config(ref_gguf, ids, n_ctx, fastgen=False, kv_q8=False)
    configs = [("full f16", ref_gguf, False, False)]
    for t, g in ggufs.items():
        configs.append((f"fastgen T={t}", g, True, False))
    mid = ggufs[0.95] if 0.95 in ggufs else ref_gguf
    _, st_mid = run_config(mid, ids[:8], n_ctx, True, False)
    meta = schema.read(mid)
    w = equal_bytes_window(meta, st_mid["kv_bytes"], head_dim, n_ctx, n_layer * n_kv)
    uni = work / f"uniform-local{w}.gguf"
    if not uni.exists():
        uniform_gguf(model_dir, w, meta.protected_frac, uni)
    configs += [(f"uniform local{w}", uni, True, False), ("full q8_0", ref_gguf, False, True),
                ("fastgen+q8_0", mid, True, True)]
    for name, g, fg, q8 in configs:
        logits, st = (full, st_full) if name == "full f16" else run_config(g, ids, n_ctx, fg, q8)
        r = {"config": name, "kv_bytes": st["kv_bytes"], "kv_ratio": st["kv_bytes"] / st_full["kv_bytes"],
             **compare(full, logits, ids, start)}
        rows.append(r)
        print(f"{name:24s} KV {r['kv_bytes'] / 2**20:7.1f} MiB ({r['kv_ratio']:6.1%})  KL {r['kl_mean']:.4f}  "
              f"top-1 {r['top1']:.3f}  ppl {r['ppl']:.2f}", flush=True)
    out = {"model": str(model_dir), "n_ctx": n_ctx, "tokens": len(ids), "scored_from": start,
           "text": "pydoc_data.topics (Python documentation)", "machine": "see README: the command's machine",
           "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
