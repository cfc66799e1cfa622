"""The profile report next to the GGUF: JSON, a policy heat map (FastGen Fig. 1 style), KV bytes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_fastgen.schema import footprint_bytes

CONTEXTS = (1024, 4096, 8192, 32768)


def build(sel, res, meta, head_dim: int, quality: dict | None, gguf: Path, protection=None) -> dict:
    counts: dict[str, int] = {}
    for row in sel.policies:
        for p in row:
            counts[p.label] = counts.get(p.label, 0) + 1
    mem = []
    for n in CONTEXTS:
        fg, full = footprint_bytes(sel.policies, head_dim, n, res.protected_frac, res.n_sink, budget_ctx=meta.budget_ctx)
        mem.append({"n_ctx": n, "fastgen_bytes": fg, "full_bytes": full, "ratio": fg / full})
    return {
        "gguf": str(gguf),
        "schema_version": meta.version,
        "threshold": sel.threshold,
        "robust_quantile": sel.quantile,
        "n_sink": res.n_sink,
        "protected_frac": res.protected_frac,
        "gqa_aggregation": "minimum over the query heads of each KV head",
        "prompts": [{"name": n, "tokens": t} for n, t in zip(res.prompt_names, res.n_tokens)],
        "policy_counts": counts,
        "classes": [c.label for c in sel.classes],
        "policies": [[p.label for p in row] for row in sel.policies],
        "head_perm": sel.perms,
        "rungs": [r.label for r in res.rungs],
        "kept_mass_stat": np.round(sel.stat, 4).tolist(),
        "stability": sel.stability(),
        "expected_kv": mem,
        "reference_quality": quality,
        "retrieval": None if protection is None else protection.report(),
    }


def plot(sel, path: Path, title: str, protected=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    labels = [c.label for c in sel.classes]
    grid = np.array([[sel.classes.index(p) for p in row] for row in sel.policies]).T  # [H_kv, L]
    colors = plt.get_cmap("viridis")(np.linspace(0.95, 0.05, len(labels)))
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * grid.shape[1] + 2), 1.0 + 0.45 * grid.shape[0] + 1.5))
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(labels) - 0.5, aspect="auto")
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head (original index)")
    ax.set_yticks(range(grid.shape[0]))
    for l, h in protected:  # retrieval heads kept full by probe evidence
        ax.text(l, h, "R", ha="center", va="center", fontsize=7, color="white", fontweight="bold")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(len(labels))]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(5, len(labels)),
              fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rule(report: dict) -> str:
    """How the policies were chosen, in words (the summary and the plot's title)."""
    if report.get("policies_from"):
        return f"policies of {Path(report['policies_from']).name}"
    if report.get("kv_budget"):
        return f"KV budget {report['kv_budget']:.0%} at n_ctx {report['ctx']}"
    return f"T = {report['threshold']}"


def write(report: dict, sel, json_path: Path, png_path: Path) -> None:
    json_path.write_text(json.dumps(report, indent=1))
    mem8k = next(m for m in report["expected_kv"] if m["n_ctx"] == 8192)
    rt = report.get("retrieval") or {}
    prot = [tuple(x) for x in rt.get("protected", [])]
    plot(sel, png_path, f"FastGen policies per KV head, {rule(report)}, KV at 8K = {mem8k['ratio']:.0%} "
                        f"of full" + (f"; R = {len(prot)} retrieval heads kept full" if rt else ""), prot)
