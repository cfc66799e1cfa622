"""Profile attention per head on calibration prompts, then choose one policy per KV head.

Kept mass of a rung for a query head on a prompt = mean over the queries of the prompt's second
half of the attention probability that falls on the rung's keep-set (FastGen §3.3; the second
half so that windows are tested at distances the first tokens cannot show). Attention maps are
reduced inside a forward hook per layer and dropped, so memory stays at one layer's map.

GQA: a KV head serves G query heads, so a rung qualifies for it only if it reaches T for every
query head of the group (minimum over the group).

Damage of a rung for a KV head = what restricting that head alone to the rung's keep-set does to
the layer's attention output: the head group's renormalised attention output minus the full one,
through o_proj into the residual stream, squared and averaged over the second-half queries,
relative to the mean squared norm of the full attention output. Mass says how much attention a
rung drops; damage says whether the dropped attention mattered (the values it would have read may
equal what the kept tokens give). Budgeted selection (`allocate`) minimises total damage. Across prompts the chosen statistic is a low
quantile (default 0.1), not the mean: an offline policy has to hold on most prompts, not on an
average one. The per-prompt choice FastGen would make online is recorded for the stability report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from llama_fastgen.schema import DEFAULT_N_SINK, class_order

from .architectures import shape
from .policies import HeadPolicy, Kind, TokenContext, ladder, to_policy


DAMAGE_STRIDE = 4  # damage is estimated on every 4th second-half query: 4x cheaper, same ranking


@dataclass
class ProfileResult:
    rungs: list[HeadPolicy]
    prompt_names: list[str]
    n_tokens: list[int]
    mass: np.ndarray            # [P, L, Hq, R] kept attention mass per rung
    damage: np.ndarray          # [P, L, H_kv, R] relative output error per rung
    protected_frac: float       # share of special/punct tokens in the calibration prompts
    n_sink: int


@dataclass
class Selection:
    policies: list[list[HeadPolicy]]        # [L][H_kv] in original head order
    stat: np.ndarray                        # [L, H_kv, R] robust statistic of the group minimum
    per_prompt: np.ndarray                  # [P, L, H_kv] rung index chosen per prompt
    chosen: np.ndarray                      # [L, H_kv] rung index chosen offline
    threshold: float
    quantile: float
    rank: np.ndarray = None                 # [R] position of each rung in cost order
    classes: list[HeadPolicy] = field(default_factory=list)
    perms: list[list[int]] = field(default_factory=list)
    layer_class_heads: list[list[int]] = field(default_factory=list)

    def stability(self) -> dict:
        same = (self.per_prompt == self.chosen[None]).mean()
        cheaper = (self.rank[self.per_prompt] < self.rank[self.chosen][None]).mean()
        return {"same_as_offline": float(same), "per_prompt_cheaper": float(cheaper),
                "per_prompt_dearer": float(1.0 - same - cheaper),
                "per_head_same": (self.per_prompt == self.chosen[None]).mean(axis=0).round(3).tolist()}


def token_context(ids: list[int], special: set[int], punct: set[int], n_sink: int) -> TokenContext:
    t = torch.tensor(ids, dtype=torch.long)
    return TokenContext(ids=t, special=torch.tensor([i in special for i in ids]),
                        punct=torch.tensor([i in punct for i in ids]), n_sink=n_sink)


@torch.no_grad()
def profile(model, prompts: list[tuple[str, list[int]]], special: set[int], punct: set[int], *,
            n_sink: int = DEFAULT_N_SINK, max_window: int = 4096, progress: bool = True) -> ProfileResult:
    n_layer, n_head, n_kv, _ = shape(model.config)
    longest = max(len(ids) for _, ids in prompts)
    rungs = ladder(max_window=min(max_window, max(16, longest // 2)), n_sink=n_sink)
    static = [i for i, r in enumerate(rungs) if r.kind != Kind.FREQUENT]
    frequent = [i for i, r in enumerate(rungs) if r.kind == Kind.FREQUENT]
    device = next(model.parameters()).device
    masses, damages, names, lens = [], [], [], []
    state: dict = {}

    def hook(module, args, kwargs, output):
        w = output[1]
        if w is None:
            raise RuntimeError("attention weights are missing: load the model with attn_implementation='eager'")
        a = w[0].float()                                   # [Hq, T, T]
        Hq, T = a.shape[0], a.shape[1]
        q0 = T // 2
        aq = a[:, q0:, :]                                  # queries of the second half
        # damage: every DAMAGE_STRIDE-th query of the second half, the o_proj projection folded
        # into one Gram matrix per KV group (||sum_h W_h d_h||^2 = d^T W^T W d)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        g = Hq // n_kv
        v = module.v_proj(hidden)[0].float().view(T, n_kv, -1).transpose(0, 1)       # [H_kv, T, D]
        D = v.shape[-1]
        v = v.repeat_interleave(g, dim=0)                                            # [Hq, T, D]
        wo = module.o_proj.weight.float().view(-1, n_kv, g * D).transpose(0, 1)      # [H_kv, E, gD]
        gram = wo.transpose(1, 2) @ wo                                               # [H_kv, gD, gD]
        ad = aq[:, ::DAMAGE_STRIDE]
        o_full = ad @ v                                                              # [Hq, q', D]
        ref = (module.o_proj.weight.float() @ o_full.transpose(0, 1).reshape(ad.shape[1], -1).T).pow(2).sum(0).mean()

        def damage(keep):                                  # keep: bool [Hq or 1, q, T]
            m = ad * keep[:, ::DAMAGE_STRIDE]
            o = (m @ v) / m.sum(-1, keepdim=True).clamp_min(1e-20)
            d = (o - o_full).view(n_kv, g, -1, D).transpose(1, 2).reshape(n_kv, -1, g * D)  # [H_kv, q', gD]
            return ((d @ gram) * d).sum(-1).mean(-1) / ref.clamp_min(1e-20)           # [H_kv]

        mass = torch.zeros(Hq, len(rungs), device=a.device)
        dmg = torch.zeros(n_kv, len(rungs), device=a.device)
        mass[:, static] = torch.einsum("hqt,rqt->hr", aq, state["masks"]) / aq.shape[1]
        for i, r in enumerate(static):
            dmg[:, r] = damage(state["masks"][i][None])
        if frequent:  # heavy hitters are ranked per KV head: attention summed over the group
            akv = a.reshape(n_kv, Hq // n_kv, *a.shape[1:]).sum(1).cpu()
            for r in frequent:
                keep = to_policy(rungs[r]).keep_rows(state["ctx"], akv, q0).to(a.device)
                keep = keep.repeat_interleave(Hq // n_kv, dim=0)
                mass[:, r] = (aq * keep).sum(-1).mean(-1)
                dmg[:, r] = damage(keep)
        state["out"][module.layer_idx] = (mass.cpu(), dmg.cpu())
        return (output[0], None) + tuple(output[2:])       # drop the map right away

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        it = prompts
        if progress:
            from tqdm import tqdm
            it = tqdm(prompts, desc="profiling attention", unit="prompt")
        for name, ids in it:
            ctx = token_context(ids, special, punct, n_sink)
            n = ctx.n
            q0 = n // 2
            keep = torch.stack([to_policy(rungs[r]).keep(ctx) for r in static])  # [R_static, T, T]
            state["masks"] = keep[:, q0:, :].to(device, torch.float32)
            state["ctx"] = ctx
            state["out"] = {}
            model(torch.tensor([ids], device=device), use_cache=False)
            masses.append(torch.stack([state["out"][l][0] for l in range(n_layer)]).numpy())
            damages.append(torch.stack([state["out"][l][1] for l in range(n_layer)]).numpy())
            names.append(name)
            lens.append(n)
    finally:
        for h in handles:
            h.remove()
    return ProfileResult(rungs=rungs, prompt_names=names, n_tokens=lens, mass=np.stack(masses), damage=np.stack(damages),
                         protected_frac=protected_share([ids for _, ids in prompts], special, punct), n_sink=n_sink)


def protected_share(prompts: list[list[int]], special: set[int], punct: set[int]) -> float:
    """Share of calibration tokens that are special or punctuation (fastgen.protected_frac)."""
    total = sum(len(ids) for ids in prompts)
    return sum(t in special or t in punct for ids in prompts for t in ids) / max(total, 1)


def select(res: ProfileResult, threshold: float, n_head_kv: int, quantile: float = 0.1, *,
           n_ctx: int = 8192, frequent: bool = True) -> Selection:
    """Cheapest rung per KV head whose robust kept mass reaches the threshold. Costs are the cells
    a rung holds at context n_ctx; frequent=False leaves the heavy-hitter rungs out (ablation)."""
    P, L, Hq, R = res.mass.shape
    g = Hq // n_head_kv
    kv = res.mass.reshape(P, L, n_head_kv, g, R).min(axis=3)          # worst query head of the group
    stat = np.quantile(kv, quantile, axis=0) if P > 1 else kv[0]
    usable = [r for r in range(R) if frequent or res.rungs[r].kind != Kind.FREQUENT]
    order = np.array(sorted(usable, key=lambda r: (res.rungs[r].cost(n_ctx, res.protected_frac, res.n_sink), r)))
    full = int(order[-1])
    assert res.rungs[full].kind == Kind.FULL
    eps = 1e-6  # the full rung has mass 1 up to rounding

    def cheapest(m):
        ok = m[..., order] >= threshold - eps
        ok[..., -1] = True
        return order[ok.argmax(axis=-1)]

    chosen, per_prompt = cheapest(stat), cheapest(kv)
    policies = [[res.rungs[chosen[l, h]] for h in range(n_head_kv)] for l in range(L)]
    rank = np.full(R, R)
    rank[order] = np.arange(len(order))
    sel = Selection(policies=policies, stat=stat, per_prompt=per_prompt, chosen=chosen,
                    threshold=threshold, quantile=quantile, rank=rank)
    arrange(sel)
    return sel


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


def allocate(res: ProfileResult, kv_budget: float, n_head_kv: int, *, n_ctx: int = 8192,
             frequent: bool = True, fixed: dict | None = None) -> list[list[HeadPolicy]]:
    """Per KV head the rung that minimises the summed damage of all heads while the cells they
    hold at n_ctx stay within kv_budget of the full cache (a multiple-choice knapsack solved by
    its Lagrangian: each head takes argmin damage + lam * cost, lam bisected). `fixed` maps
    (layer, head) to a rung that is not up for choice (retrieval heads kept full).
    Raises BudgetTooSmall when even the cheapest rungs exceed the budget."""
    from .protect import BudgetTooSmall

    P, L, H, R = res.damage.shape
    fixed = fixed or {}
    usable = [r for r in range(R) if frequent or res.rungs[r].kind != Kind.FREQUENT]
    cost = np.array([res.rungs[r].cost(n_ctx, res.protected_frac, res.n_sink) / n_ctx for r in usable])
    dmg = res.damage.mean(axis=0)[..., usable]                       # [L, H, R']
    index = {p: i for i, p in enumerate(res.rungs[r] for r in usable)}
    free = np.ones((L, H), dtype=bool)
    spent = 0.0
    for (l, h), p in fixed.items():
        free[l, h] = False
        spent += p.cost(n_ctx, res.protected_frac, res.n_sink) / n_ctx
    room = kv_budget * L * H - spent

    def pick(lam):
        c = np.argmin(dmg + lam * cost, axis=-1)                     # [L, H]
        return c, float(cost[c][free].sum())

    need = pick(1e12)[1]
    if need > room + 1e-9:
        raise BudgetTooSmall(f"{len(fixed)} fixed heads and the cheapest rungs elsewhere need "
                             f"{(spent + need) / (L * H):.1%} of the full KV at n_ctx {n_ctx}, over the {kv_budget:.1%} budget")
    if pick(0.0)[1] <= room:
        choice = pick(0.0)[0]
    else:
        lo, hi = -12.0, 12.0                 # log10(lam): 10**hi fits (checked above)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if pick(10 ** mid)[1] > room else (lo, mid)
        choice = pick(10 ** hi)[0]
    out = [[res.rungs[usable[choice[l, h]]] for h in range(H)] for l in range(L)]
    for (l, h), p in fixed.items():
        out[l][h] = p
    return out
