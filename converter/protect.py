"""Retrieval protection: which KV heads keep their whole history, chosen by evidence.

1. Probes score every query head (probes/induction.py: echo and induction on repeated random
   tokens; probes/copy_paste.py: Wu et al.'s copy score on needle prompts the model answers).
   A KV head takes the maximum over its query group: it must be kept if any of them retrieves.
2. Heads are ranked by their best probe score, each probe normalised by its largest head score
   (so every probe can put its top heads first); the winning probe is recorded per head.
3. The protected set is the shortest prefix of that ranking with which the PyTorch reference
   (reference.py, the same keep-sets and eviction the native cache runs) answers a held-aside set
   of needle prompts as often as the full cache does, with a mean answer log-probability at most
   `margin` nats per token below the full cache's: prefix sizes 0, 1, 2, 4, ... until one passes,
   then bisection between the last failure and the first pass.

Probe prompts hide their needles in the calibration texts; held-aside prompts use other seeds,
names and depths, and are long enough that the needle lies beyond every compressed head's reach.
When the full model itself fails the probes, nothing is protected and the report says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llama_fastgen.schema import HeadPolicy, Kind

from . import reference
from .probes import copy_paste, induction, tasks

FULL = HeadPolicy(Kind.FULL)


@dataclass
class Protection:
    scores: dict[str, list]                 # probe -> [L][H_kv] group-max score
    ranking: list[tuple[int, int]]          # (layer, KV head), most retrieval-like first
    by_probe: dict[tuple[int, int], str]    # the probe that ranked each head
    protected: list[tuple[int, int]]
    trials: list[dict] = field(default_factory=list)   # k -> answered, mean answer log-prob
    full_answered: int = 0
    n_validation: int = 0
    answered: int | None = None             # the reference with the protected set
    policies: list | None = None            # [L][H_kv] final policies
    base: list | None = None                # [L][H_kv] policies with nothing protected
    note: str = ""

    def report(self) -> dict:
        return {"scores": self.scores, "protected": [list(x) for x in self.protected],
                "ranking": [list(x) for x in self.ranking],
                "base_policies": None if self.base is None else [[p.label for p in row] for row in self.base],
                "protected_by": {f"{l}.{h}": self.by_probe[(l, h)] for l, h in self.protected},
                "search": self.trials, "full_answered": self.full_answered, "answered": self.answered,
                "n_validation": self.n_validation, "note": self.note}


def group_max(score_q: np.ndarray, n_kv: int) -> np.ndarray:
    """[L, Hq] -> [L, H_kv]: the strongest query head of each group."""
    L, Hq = score_q.shape
    return score_q.reshape(L, n_kv, Hq // n_kv).max(axis=2)


def rank(scores: dict[str, np.ndarray]) -> tuple[list[tuple[int, int]], dict]:
    names = list(scores)
    norm = np.stack([scores[n] / max(float(scores[n].max()), 1e-9) for n in names])   # [P, L, H]
    best = norm.max(axis=0)
    which = norm.argmax(axis=0)
    L, H = best.shape
    order = sorted(((l, h) for l in range(L) for h in range(H)), key=lambda x: (-best[x], x))
    return order, {x: names[which[x]] for x in order}


def with_protected(policies, protected) -> list[list[HeadPolicy]]:
    out = [list(row) for row in policies]
    for l, h in protected:
        out[l][h] = FULL
    return out


@torch.no_grad()
def answered(model, prompts, policies, make_ctx, chunks, need: int = 0) -> tuple[int, float]:
    """(prompts whose answer is the reference's top-1 at every answer token, mean answer log-prob).
    Stops early once fewer than `need` prompts can still be answered."""
    ok, lp = 0, []
    for i, p in enumerate(prompts):
        if ok + len(prompts) - i < need:
            break
        ids = p.ids + p.answer
        ctx = None if policies is None else make_ctx(ids)
        logits = reference.logits(model, ids, policies, ctx, last=len(p.answer) + 1,
                                  chunks=None if policies is None or not reference.has_frequent(policies) else chunks)
        ans = logits[:-1]
        gold = torch.tensor(p.answer)
        ok += bool((ans.argmax(-1) == gold).all())
        lp.append(float(torch.log_softmax(ans.double(), -1)[torch.arange(len(gold)), gold].mean()))
    return ok, float(np.mean(lp)) if lp else 0.0


def probe_scores(model, tok, special: set[int], haystack: str, n_kv: int, *, n_tokens: int = 1024,
                 n_prompts: int = 8, log=None) -> tuple[dict[str, np.ndarray], list[bool]]:
    """Every probe's score per KV head ([L, H_kv], max over the group) and which copy-paste
    prompts the full model answered."""
    if log:
        log(f"probes: echo and induction on repeated random tokens, copy-paste on {n_prompts} needle prompts")
    ind = induction.scores(model, tok, special)
    prompts = [tasks.needle(tok, n_tokens, float(d), seed, haystack)
               for seed, d in enumerate(np.linspace(0.05, 0.95, n_prompts))]
    copy, ok = copy_paste.scores(model, prompts)
    if log:
        log(f"probes: copy-paste prompts answered by the full model {sum(ok)}/{len(ok)}")
    q = {"echo": ind["echo"], "induction": ind["induction"], "copy": copy}
    return {k: group_max(v, n_kv) for k, v in q.items()}, ok


def validation_prompts(tok, haystack: str, n_tokens: int, n: int = 6) -> list:
    """Held-aside needles: seeds and depths the probes never used."""
    return [tasks.needle(tok, n_tokens, float(d), 1000 + i, haystack) for i, d in enumerate(np.linspace(0.1, 0.9, n))]


class BudgetTooSmall(ValueError):
    pass


def search(model, policies_for, scores_kv: dict[str, np.ndarray], validation, make_ctx, chunks, *,
           margin: float = 0.1, full: tuple[int, float] | None = None, progress=None) -> Protection:
    """policies_for(protected) -> [L][H_kv] policies with those heads full (raises BudgetTooSmall
    when a KV budget cannot hold them)."""
    ranking, by_probe = rank(scores_kv)
    prot = Protection(scores={k: np.round(v, 4).tolist() for k, v in scores_kv.items()}, ranking=ranking,
                      by_probe=by_probe, protected=[], n_validation=len(validation))
    full_ok, full_lp = full or answered(model, validation, None, make_ctx, chunks)
    prot.full_answered = full_ok
    prot.trials.append({"k": "full", "answered": full_ok, "answer_logprob": round(full_lp, 4)})
    cache: dict[int, bool] = {}

    def passes(k: int) -> bool:
        if k not in cache:
            try:
                pol = policies_for(ranking[:k])
            except BudgetTooSmall as e:
                prot.note = f"the KV budget cannot keep {k} heads full ({e}); retrieval parity not reached"
                raise
            ok, lp = answered(model, validation, pol, make_ctx, chunks, need=full_ok)
            cache[k] = ok >= full_ok and lp >= full_lp - margin
            prot.trials.append({"k": k, "answered": ok, "answer_logprob": round(lp, 4)})
            if progress:
                progress(k, ok, full_ok)
        return cache[k]

    n = len(ranking)
    lo, k = -1, 0          # lo: largest size known to fail
    try:
        while not passes(k):
            lo, k = k, (1 if k == 0 else min(n, 2 * k))
            if lo == n:
                break
        hi = k
    except BudgetTooSmall:  # the budget, not the evidence, decides: the most heads it can hold
        hi = k - 1
        while hi > 0 and not _fits(policies_for, ranking[:hi]):
            hi -= 1
        passes(hi)
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    prot.protected = ranking[:hi]
    prot.policies = policies_for(prot.protected)
    prot.base = policies_for([])
    prot.answered = next((t["answered"] for t in prot.trials if t["k"] == hi), None)
    return prot


def _fits(policies_for, protected) -> bool:
    try:
        policies_for(protected)
        return True
    except BudgetTooSmall:
        return False


def run(model, tok, policies_for, special: set[int], punct: set[int], n_sink: int, haystack: str, *,
        probe_tokens: int = 2048, chunks: int = 64, margin: float = 0.1, log=print) -> Protection:
    """Probes, then the protected-set search; the fallback (nothing protected) says why."""
    from .architectures import shape
    from .profiling import token_context

    n_kv = shape(model.config)[2]
    scores, ok = probe_scores(model, tok, special, haystack, n_kv, log=log)
    val = validation_prompts(tok, haystack, probe_tokens)
    full = answered(model, val, None, None, chunks)
    full_ok = full[0]
    if sum(ok) < len(ok) // 2 or full_ok < len(val) // 2:
        ranking, by_probe = rank(scores)
        note = (f"the full model answers only {sum(ok)}/{len(ok)} probe and {full_ok}/{len(val)} held-aside "
                f"needle prompts, so retrieval cannot be measured on it: no head protected (attention mass only)")
        log("warning: " + note)
        return Protection(scores={k: np.round(v, 4).tolist() for k, v in scores.items()}, ranking=ranking,
                          by_probe=by_probe, protected=[], full_answered=full_ok, n_validation=len(val), note=note,
                          policies=policies_for([]), base=policies_for([]))

    def progress(k, got, want):
        log(f"  protect {k:3d} heads: reference answers {got}/{len(val)} held-aside needles (full cache {want})")

    return search(model, policies_for, scores, val, lambda ids: token_context(ids, special, punct, n_sink), chunks,
                  margin=margin, full=full, progress=progress)
