"""The evaluated configurations: a GGUF plus how to run it, and the converters of fastgen, its
ablations and the baselines at equal bytes (StreamingLLM, H2O, DuoAttention-style, random heads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llama_fastgen import schema
from llama_fastgen.evaluation.child import in_child

GPU_LAYERS = 0  # scripts/eval.py --gpu: -1 (all layers and the KV cache on the GPU)


class Config:
    """A GGUF plus how to run it: fastgen on or off, KV cache type."""

    def __init__(self, name: str, gguf: Path, fastgen: bool = True, kv: str = "f16", family: str = ""):
        self.name, self.gguf, self.fastgen, self.kv, self.family = name, Path(gguf), fastgen, kv, family or name

    def llama_kwargs(self) -> dict:
        # every core (llama-cpp-python's default is half of them); all layers on the GPU with --gpu
        kw = {"flash_attn": True, "n_threads": os.cpu_count(), "n_gpu_layers": GPU_LAYERS}
        if not self.fastgen:
            kw["kv_overrides"] = dict(schema.STOCK_CACHE)
        if self.kv != "f16":   # in the measuring child, where libllama is loaded anyway: ggml's own type ids
            import llama_cpp   # on our libllama: this module imported llama_fastgen

            t = getattr(llama_cpp, f"GGML_TYPE_{self.kv.upper()}")
            kw.update(type_k=t, type_v=t)
        return kw


def uniform_gguf(model_dir: Path, window: int, protected_frac: float, out: Path, policy=None, punct: bool = True) -> Path:
    """Every KV head on one policy (default special+punct+local(window)): a uniform baseline."""
    from transformers import AutoConfig, AutoTokenizer

    from llama_fastgen.converter import gguf_export, tokens
    from llama_fastgen.converter.architectures import shape

    n_layer, _, n_kv, _ = shape(AutoConfig.from_pretrained(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = policy or schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, window)
    meta = schema.FastgenMetadata(
        threshold=0.0, n_sink=schema.DEFAULT_N_SINK, classes=[policy], layer_class_heads=[[n_kv]] * n_layer,
        head_perm=[list(range(n_kv))] * n_layer, special_token_ids=tokens.special_ids(tok),
        punct_token_ids=tokens.punct_ids(tok) if punct else [],
        protected_frac=protected_frac if punct else 0.0, calibration={"uniform_baseline": policy.label})
    return gguf_export.convert(model_dir, out, "f32", extra_kv=meta.to_kv())


CONVERT_ARGS: list[str] = []  # extra converter arguments (--quick: small profiling sizes)


def convert(model_dir: Path, out: Path, *args: str) -> Path:
    """Every evaluated GGUF goes through the converter (one writer; f16 weights: every config is
    compared with the full cache of the same weights); cached by file name."""
    if not out.exists():  # in a child process: torch's CUDA and ggml's CUDA in one process crash on exit
        # torch before libllama: a CUDA libllama loaded first makes torch's import abort (seen on the H200)
        r = subprocess.run([sys.executable, "-c", "import torch, runpy; runpy.run_module('llama_fastgen.converter.convert', "
                            "run_name='__main__', alter_sys=True)", str(model_dir), "--profile",
                            "--outfile", str(out), "--outtype", "f16", "--no-quality", *CONVERT_ARGS, *args])
        assert r.returncode == 0, f"conversion of {out.name} failed"
    return out


def without_policies(args: tuple) -> tuple:
    return tuple(x for i, x in enumerate(args) if x != "--policies" and (i == 0 or args[i - 1] != "--policies"))


def policy_gguf(model_dir: Path, out: Path, table: list[list], *args: str) -> Path:
    """A GGUF with this per-head policy table (labels, [layer][original KV head])."""
    spec = out.with_suffix(".policies.json")
    spec.write_text(json.dumps({"policies": [[p.label for p in row] for row in table]}))
    return convert(model_dir, out, "--policies", str(spec), *args)


def widest_window(w: int, n_ctx: int, n_ubatch: int, share: float, n_sink: int = schema.DEFAULT_N_SINK) -> int:
    """The largest window whose class gets the same cells as window w (capacities are padded to
    SLICE_PAD cells): a baseline should not pay for cells it leaves unused."""

    def cells(x):
        meta = schema.FastgenMetadata(threshold=0, n_sink=n_sink, classes=[schema.HeadPolicy(schema.Kind.SPECIAL_PUNCT_LOCAL, x)],
                                      layer_class_heads=[[1]], head_perm=[[0]], special_token_ids=[], punct_token_ids=[],
                                      protected_frac=share)
        return schema.class_capacity(meta, 0, n_ctx, n_ubatch)

    c = cells(w)
    while w < n_ctx and cells(w + 1) == c:
        w += 1
    return w


def fit_bytes(make, lo: int, hi: int, target: int, nbytes) -> tuple[object, int]:
    """make(x) for the integer x in [lo, hi] whose bytes (nbytes(make(x)), increasing in x) come
    closest to `target` from below or above: baselines at the bytes of the fastgen config."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nbytes(make(mid)) <= target else (lo, mid)
    best = min((lo, hi), key=lambda x: abs(nbytes(make(x)) - target))
    return make(best), best


FAMILIES = ("fastgen", "fastgen mass-only", "StreamingLLM", "H2O", "DuoAttention-style", "random-Duo", "random-protect",
            "full q8_0", "full q4_0", "fastgen+q8_0")


def build_configs(model_dir: Path, work: Path, thresholds, n_ctx: int, n_ubatch: int, families=FAMILIES,
                  fastgen_args: tuple = ()) -> list[Config]:
    """fastgen (retrieval-protected) and its mass-only ablation, by the converter's default rule (a
    KV budget) or at each threshold; at the KV bytes of the first fastgen config (C API, same n_ctx and n_ubatch): StreamingLLM
    (sinks + window), H2O (heavy hitters + window), DuoAttention-style (the same number of full
    heads as fastgen, chosen by the probe ranking; sinks + window elsewhere), the same with the full
    heads chosen at random (random-Duo: Wu et al.'s causal control), and that random choice with the
    rest as fastgen (random-protect); then q8_0, q4_0 and fastgen + q8_0."""
    import random

    from llama_fastgen.converter.architectures import shape
    from llama_fastgen.converter.policies.ladder import frequent_rung
    from llama_fastgen.schema import HeadPolicy, Kind
    from transformers import AutoConfig

    n_layer, _, n_kv, head_dim = shape(AutoConfig.from_pretrained(model_dir))
    cfgs: list[Config] = []
    budget = next((fastgen_args[i + 1] for i, x in enumerate(fastgen_args) if x == "--kv-budget"), None)
    # --thresholds: the attention-mass rule at each T; else the converter's rule (default: its KV budget)
    from llama_fastgen.converter.convert import DEFAULT_KV_BUDGET
    variants = [(f"T={t}", ("--threshold", str(t))) for t in thresholds] or [(f"B={budget or DEFAULT_KV_BUDGET}", ())]
    for tag, rule in variants:
        g = convert(model_dir, work / f"fastgen-{tag}.gguf", *rule, *fastgen_args)
        cfgs.append(Config(f"fastgen {tag}", g, family="fastgen"))
        if "fastgen mass-only" in families:   # profiled again without protection (a given table would override it)
            g = convert(model_dir, work / f"fastgen-{tag}-mass.gguf", *rule, "--no-retrieval", *without_policies(fastgen_args))
            cfgs.append(Config(f"fastgen {tag} mass-only", g, family="fastgen mass-only"))
    main = cfgs[0]
    stock = main.gguf
    rep = json.loads(main.gguf.with_suffix(".fastgen.json").read_text())
    target = in_child({"job": "bytes", "cfg": vars(main), "n_ctx": n_ctx, "ubatch": n_ubatch})

    # the protected-token budget of windowed classes follows the calibration's special(+punct) share
    from llama_fastgen.converter import calibration, tokens
    from llama_fastgen.converter.profiling import protected_share
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    max_tokens = int(CONVERT_ARGS[CONVERT_ARGS.index("--max-tokens") + 1]) if "--max-tokens" in CONVERT_ARGS else 1024
    calib = [calibration.to_token_ids(tok, n, t, max_tokens) for n, t in calibration.load_texts()]
    share = protected_share(calib, set(tokens.special_ids(tok)), set())   # baselines keep no punctuation

    def nbytes(table):
        classes = sorted({p for row in table for p in row})
        meta = schema.FastgenMetadata(threshold=0, n_sink=schema.DEFAULT_N_SINK, classes=classes,
                                      layer_class_heads=[[row.count(c) for c in classes] for row in table],
                                      head_perm=[list(range(n_kv))] * n_layer, special_token_ids=[], punct_token_ids=[],
                                      protected_frac=share)
        return sum(schema.kv_bytes(meta, head_dim, n_ctx, n_ubatch))

    def uniform_window(full=()):
        """sinks + window on every head not in `full`; some heads one padding step (SLICE_PAD cells) wider
        than the others, so the bytes meet the target closely."""
        def table(w, m=0):
            out, i = [], 0
            for l in range(n_layer):
                row = []
                for h in range(n_kv):
                    if (l, h) in full:
                        row.append(HeadPolicy(Kind.FULL))
                    else:
                        row.append(HeadPolicy(Kind.SPECIAL_PUNCT_LOCAL, w + (schema.SLICE_PAD if i < m else 0)))
                        i += 1
                row and out.append(row)
            return out
        w = fit_bytes(table, 1, n_ctx, target, nbytes)[1]
        w = max(1, w - schema.SLICE_PAD) if nbytes(table(w)) > target else w
        w = widest_window(w, n_ctx, n_ubatch, share)        # w + SLICE_PAD is then the widest of the next step
        return fit_bytes(lambda m: table(w, m), 0, n_layer * n_kv - len(full), target, nbytes)[0]

    streaming = uniform_window()
    h2o, hh_budget = fit_bytes(lambda b: [[frequent_rung(b)] * n_kv for _ in range(n_layer)],
                               64, n_ctx, target, nbytes)
    baselines = [("StreamingLLM", streaming, f"sinks + window {min(p.window for r in streaming for p in r)}-"
                                              f"{max(p.window for r in streaming for p in r)}"),
                 ("H2O", h2o, f"heavy hitters, budget {hh_budget}")]
    rt = rep.get("retrieval") or {}
    # as many full heads as the converter protected; where it protected none (Qwen: the budget rule's
    # full heads already answer the probes), as many as fastgen's table keeps full
    k = len(rt.get("protected", [])) or sum(p == "full" for row in rep["policies"] for p in row)
    if k and rt.get("ranking"):
        ranking = [tuple(x) for x in rt["ranking"]]
        chosen = random.Random(0).sample(ranking, k)      # Wu et al.'s control: the same count, at random
        overlap = len(set(chosen) & set(ranking[:k]))
        duo = uniform_window(full=set(ranking[:k]))
        rand_duo = uniform_window(full=set(chosen))
        base = [[HeadPolicy.from_label(x) for x in row] for row in rt["base_policies"]]
        rand = [list(r) for r in base]
        for l, h in chosen:
            rand[l][h] = HeadPolicy(Kind.FULL)
        baselines += [("DuoAttention-style", duo, f"{k} probe-ranked heads full, sinks + window elsewhere"),
                      ("random-Duo", rand_duo, f"{k} random heads full ({overlap} of them probe-ranked), "
                                               "sinks + window elsewhere"),
                      ("random-protect", rand, f"{k} random heads full, the rest as fastgen")]
    for fam, table, what in baselines:
        if fam not in families:
            continue
        # sized above for n_ctx, so their windows stay fixed; random-protect grows with n_ctx as fastgen does
        extra = (("--budget-ctx", str(rep.get("budget_ctx") or 0)) if fam == "random-protect"
                 else ("--no-punct", "--budget-ctx", "0"))
        g = policy_gguf(model_dir, work / f"{fam}.gguf", table, *extra)
        cfgs.append(Config(f"{fam} ({what})", g, family=fam))
    cfgs += [c for c in (Config("full q8_0", stock, fastgen=False, kv="q8_0", family="full q8_0"),
                         Config("full q4_0", stock, fastgen=False, kv="q4_0", family="full q4_0"),
                         Config(f"{main.name}+q8_0", main.gguf, kv="q8_0", family="fastgen+q8_0")) if c.family in families]
    return [Config("full f16", stock, fastgen=False, family="full")] + cfgs
