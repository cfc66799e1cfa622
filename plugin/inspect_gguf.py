"""`llama-fastgen inspect`: the policy table of a fastgen GGUF and its KV footprint."""
from __future__ import annotations

import json

from . import schema

CONTEXTS = (4096, 8192, 32768)


def allocated(path: str, n_ctx: int, n_ubatch: int = 512) -> dict:
    """Create a real context and read what its cache allocated (C API), not a formula."""
    from . import llama_cpp, native

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_ubatch=n_ubatch, verbose=False)
    try:
        return native.cache_stats(llm)
    finally:
        llm.close()


def table(path: str, n_ctx: int | None, as_json: bool) -> str:
    import gguf

    meta = schema.read(path)
    if meta is None:
        return f"{path}: no fastgen metadata (a plain GGUF: runs with the full cache)"
    r = gguf.GGUFReader(path)
    head_dim = schema.arch_int(r, "attention.key_length", path, default=0) or \
        schema.arch_int(r, "embedding_length", path) // schema.arch_int(r, "attention.head_count", path)
    ctxs = (n_ctx,) if n_ctx else CONTEXTS
    mem = []
    for n in ctxs:
        fg, full = schema.footprint_bytes(meta.head_policies(), head_dim, n, meta.protected_frac, meta.n_sink,
                                          budget_ctx=meta.budget_ctx)
        alloc = allocated(path, n)
        mem.append({"n_ctx": n, "policy_bytes": fg, "full_bytes": full, "ratio": fg / full,
                    "allocated_bytes": alloc["kv_bytes"], "allocated_ratio": alloc["kv_bytes"] / alloc["full_bytes"],
                    "classes": alloc["classes"]})
    if as_json:
        return json.dumps({"gguf": path, "threshold": meta.threshold, "n_sink": meta.n_sink, "budget_ctx": meta.budget_ctx,
                           "classes": [c.label for c in meta.classes],
                           "layer_class_heads": meta.layer_class_heads, "kv": mem}, indent=1)
    grow = (f"; windows and budgets are for n_ctx {meta.budget_ctx} and grow with larger contexts"
            if meta.budget_ctx else "; windows and budgets fixed at every n_ctx")
    lines = [f"{path}: fastgen schema v{meta.version}, T = {meta.threshold:g}, {meta.n_sink} sinks, "
             f"{len(meta.special_token_ids)} special + {len(meta.punct_token_ids)} punctuation ids protected" + grow,
             "layer  " + "  ".join(f"{c.label:>22}" for c in meta.classes)]
    for l, row in enumerate(meta.layer_class_heads):
        lines.append(f"{l:>5}  " + "  ".join(f"{n:>22}" for n in row))
    for m in mem:
        lines.append(f"KV (f16) at n_ctx {m['n_ctx']:>6}: allocated {m['allocated_bytes'] / 2**20:8.1f} MiB vs full "
                     f"{m['full_bytes'] / 2**20:8.1f} MiB ({m['allocated_ratio']:.0%}); tokens the policy keeps: "
                     f"{m['policy_bytes'] / 2**20:.1f} MiB ({m['ratio']:.0%})")
        if meta.budget_ctx and m["n_ctx"] > meta.budget_ctx:
            lines.append("    runs " + ", ".join(c["class"] for c in m["classes"]))
    return "\n".join(lines)
