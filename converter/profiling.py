"""Profile attention per head on calibration prompts, then choose one policy per KV head.

Kept mass of a rung for a query head on a prompt = mean over the queries of the prompt's second
half of the attention probability that falls on the rung's keep-set (FastGen §3.3; the second
half so that windows are tested at distances the first tokens cannot show). Attention maps are
reduced inside a forward hook per layer and dropped, so memory stays at one layer's map.

GQA: a KV head serves G query heads, so a rung qualifies for it only if it reaches T for every
query head of the group (minimum over the group). Across prompts the chosen statistic is a low
quantile (default 0.1), not the mean: an offline policy has to hold on most prompts, not on an
average one. The per-prompt choice FastGen would make online is recorded for the stability report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .architectures import shape
from .policies import Frequent, HeadPolicy, Kind, Local, Punct, Special, TokenContext, ladder, to_policy


@dataclass
class ProfileResult:
    rungs: list[HeadPolicy]
    prompt_names: list[str]
    n_tokens: list[int]
    mass: np.ndarray            # [P, L, Hq, R] kept attention mass per rung
    frequent_mass: np.ndarray   # [P, L, Hq, 2]: special+punct+frequent, ...+local(r*T) (measured only)
    protected_frac: float       # share of special/punct tokens in the calibration prompts
    n_sink: int
    frequent_ratio: float


@dataclass
class Selection:
    policies: list[list[HeadPolicy]]        # [L][H_kv] in original head order
    stat: np.ndarray                        # [L, H_kv, R] robust statistic of the group minimum
    per_prompt: np.ndarray                  # [P, L, H_kv] rung index chosen per prompt
    chosen: np.ndarray                      # [L, H_kv] rung index chosen offline
    threshold: float
    quantile: float
    classes: list[HeadPolicy] = field(default_factory=list)
    perms: list[list[int]] = field(default_factory=list)
    layer_class_heads: list[list[int]] = field(default_factory=list)

    def stability(self) -> dict:
        same = (self.per_prompt == self.chosen[None]).mean()
        cheaper = (self.per_prompt < self.chosen[None]).mean()
        return {"same_as_offline": float(same), "per_prompt_cheaper": float(cheaper),
                "per_prompt_dearer": float(1.0 - same - cheaper),
                "per_head_same": (self.per_prompt == self.chosen[None]).mean(axis=0).round(3).tolist()}


def token_context(ids: list[int], special: set[int], punct: set[int], n_sink: int) -> TokenContext:
    t = torch.tensor(ids, dtype=torch.long)
    return TokenContext(ids=t, special=torch.tensor([i in special for i in ids]),
                        punct=torch.tensor([i in punct for i in ids]), n_sink=n_sink)


@torch.no_grad()
def profile(model, prompts: list[tuple[str, list[int]]], special: set[int], punct: set[int], *,
            n_sink: int = 4, max_window: int = 4096, frequent_ratio: float = 0.3,
            progress: bool = True) -> ProfileResult:
    n_layer, n_head, _, _ = shape(model.config)
    longest = max(len(ids) for _, ids in prompts)
    rungs = ladder(max_window=min(max_window, max(16, longest // 2)))
    device = next(model.parameters()).device
    masses, fmasses, names, lens = [], [], [], []
    protected = total = 0
    state: dict = {}

    def hook(module, args, output):
        w = output[1]
        if w is None:
            raise RuntimeError("attention weights are missing: load the model with attn_implementation='eager'")
        a = w[0].float()                                   # [Hq, T, T]
        q0 = a.shape[1] // 2
        aq = a[:, q0:, :]                                  # queries of the second half
        m = state["masks"]                                 # [R, q, T]
        mass = torch.einsum("hqt,rqt->hr", aq, m) / aq.shape[1]
        freq = Frequent(frequent_ratio).keep(state["ctx"], a.cpu()).to(a.device)[:, q0:, :]
        sp = state["sp"]
        f1 = (aq * (freq | sp[None])).sum(-1).mean(-1)
        f2 = (aq * (freq | sp[None] | state["loc"][None])).sum(-1).mean(-1)
        state["out"][module.layer_idx] = (mass.cpu(), torch.stack([f1, f2], -1).cpu())
        return (output[0], None) + tuple(output[2:])       # drop the map right away

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    try:
        it = prompts
        if progress:
            from tqdm import tqdm
            it = tqdm(prompts, desc="profiling attention", unit="prompt")
        for name, ids in it:
            ctx = token_context(ids, special, punct, n_sink)
            n = ctx.n
            q0 = n // 2
            keep = torch.stack([to_policy(r).keep(ctx) for r in rungs])       # [R, T, T]
            state["masks"] = keep[:, q0:, :].to(device, torch.float32)
            sp = (Special() | Punct()).keep(ctx)[q0:, :]
            state["sp"] = sp.to(device)
            state["loc"] = Local(max(1, int(np.ceil(frequent_ratio * n)))).keep(ctx)[q0:, :].to(device)
            state["ctx"] = ctx
            state["out"] = {}
            model(torch.tensor([ids], device=device), use_cache=False)
            masses.append(torch.stack([state["out"][l][0] for l in range(n_layer)]).numpy())
            fmasses.append(torch.stack([state["out"][l][1] for l in range(n_layer)]).numpy())
            names.append(name)
            lens.append(n)
            protected += int((ctx.special | ctx.punct).sum())
            total += n
    finally:
        for h in handles:
            h.remove()
    return ProfileResult(rungs=rungs, prompt_names=names, n_tokens=lens, mass=np.stack(masses),
                         frequent_mass=np.stack(fmasses), protected_frac=protected / max(total, 1),
                         n_sink=n_sink, frequent_ratio=frequent_ratio)


def select(res: ProfileResult, threshold: float, n_head_kv: int, quantile: float = 0.1) -> Selection:
    """Cheapest rung per KV head whose robust kept mass reaches the threshold."""
    P, L, Hq, R = res.mass.shape
    g = Hq // n_head_kv
    kv = res.mass.reshape(P, L, n_head_kv, g, R).min(axis=3)          # worst query head of the group
    stat = np.quantile(kv, quantile, axis=0) if P > 1 else kv[0]
    eps = 1e-6  # the full rung has mass 1 up to rounding
    ok = stat >= threshold - eps
    ok[..., -1] = True
    chosen = ok.argmax(axis=-1)
    okp = kv >= threshold - eps
    okp[..., -1] = True
    per_prompt = okp.argmax(axis=-1)
    policies = [[res.rungs[chosen[l, h]] for h in range(n_head_kv)] for l in range(L)]
    sel = Selection(policies=policies, stat=stat, per_prompt=per_prompt, chosen=chosen,
                    threshold=threshold, quantile=quantile)
    arrange(sel)
    return sel


def class_order(p: HeadPolicy):
    """Full first, then shrinking windows: the order of classes in the GGUF and of heads in a layer."""
    return (p.kind != Kind.FULL, -p.window, -int(p.kind))


def arrange(sel: Selection) -> None:
    """Fill classes, per-layer head permutations and per-layer class head counts."""
    sel.classes = sorted({p for row in sel.policies for p in row}, key=class_order)
    index = {c: i for i, c in enumerate(sel.classes)}
    sel.perms, sel.layer_class_heads = [], []
    for row in sel.policies:
        perm = sorted(range(len(row)), key=lambda h: (index[row[h]], h))
        counts = [0] * len(sel.classes)
        for p in row:
            counts[index[p]] += 1
        sel.perms.append(perm)
        sel.layer_class_heads.append(counts)
