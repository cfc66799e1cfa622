#!/usr/bin/env python3
"""Convert a Hugging Face model to GGUF; with --profile, give every KV head a FastGen policy.

    convert.py MODEL_DIR --outfile OUT.gguf                      # exactly the pinned converter
    convert.py --profile MODEL_DIR --outfile OUT.gguf [--threshold 0.95] [--calibration FILE_OR_DIR]

With --profile:
  1. load the model in PyTorch with eager attention (CUDA when present),
  2. measure per head the attention each rung of the ladder keeps on calibration prompts,
  3. choose per KV head the cheapest rung reaching T (worst query head of the group, low quantile
     over prompts),
  4. find the retrieval heads (echo/induction and copy-paste probes) and keep the smallest set of
     them full with which the PyTorch reference answers held-aside needle prompts like the full
     cache (--no-retrieval skips this),
  5. permute heads inside each layer so each policy class is contiguous,
  6. write the GGUF with the pinned convert_hf_to_gguf.py plus fastgen.* metadata,
  7. write OUT.fastgen.json and OUT.fastgen.png: policies, stability, expected KV bytes and the
     quality of the PyTorch reference against the full cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python converter/convert.py): use the installed package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]  # no shadowing by siblings
    from llama_fastgen.converter.convert import main as _installed_main

    sys.exit(_installed_main())

from llama_fastgen.schema import DEFAULT_N_SINK

from . import gguf_export

log = logging.getLogger("llama-fastgen.convert")


class UsageError(ValueError):
    pass


# The default rule: a byte budget at --ctx (FastGen's r = 0.3 read as bytes), spent where the measured
# output damage is largest; retrieval heads full first. --threshold is the attention-mass rule.
DEFAULT_KV_BUDGET = 0.3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="llama-fastgen-convert", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, metavar="MODEL_DIR", help="Hugging Face model directory")
    ap.add_argument("--outfile", type=Path, required=True, help="GGUF to write")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "auto"],
                    help="weight type of the GGUF (default: f16)")
    ap.add_argument("--profile", action="store_true", help="profile attention and write fastgen policies")
    ap.add_argument("--policies", type=Path, metavar="JSON",
                    help="write these per-head policies instead of profiling: a report JSON of an earlier "
                         "run (its 'policies' table, labels per layer and original KV head), e.g. to build "
                         "baselines or ablations")
    g = ap.add_argument_group("profiling")
    g.add_argument("--kv-budget", type=float, metavar="FRACTION",
                   help=f"the KV bytes at --ctx as a fraction of the full cache, in (0, 1], before windows "
                        f"grow (--budget-ctx); rungs are chosen per head to least damage the attention output "
                        f"(default {DEFAULT_KV_BUDGET} unless --threshold is given)")
    g.add_argument("--threshold", "-T", type=float,
                   help="instead of --kv-budget: recovery threshold T in (0, 1], the share of attention every "
                        "query head of a KV head must keep (the FastGen rule; 0.95 is its usual value)")
    g.add_argument("--calibration", type=Path,
                   help="a .txt file or a directory of .txt files (default: the bundled varied set)")
    g.add_argument("--max-tokens", type=int, default=1024, help="tokens per calibration prompt (default 1024)")
    g.add_argument("--n-sink", type=int, default=DEFAULT_N_SINK,
                   help=f"attention sinks kept by compressed heads (default {DEFAULT_N_SINK})")
    g.add_argument("--max-window", type=int, default=4096, help="largest local window tried (default 4096)")
    g.add_argument("--ctx", type=int, default=8192,
                   help="context length at which rung costs are compared and the KV budget is spent "
                        "(default 8192)")
    g.add_argument("--budget-ctx", type=int, metavar="N",
                   help="the n_ctx the windows and heavy-hitter budgets chosen at --ctx are kept for "
                        "(default: half of --ctx); a larger context grows them in proportion, so a head "
                        "keeps the same share of a longer text and the KV takes about --kv-budget + 5%% "
                        "at --ctx (measured better at 4K-8K than fixed sizes: docs/RESULTS.md); "
                        "0 keeps them fixed at every context")
    g.add_argument("--no-frequent", action="store_true",
                   help="leave the heavy-hitter (frequent) rungs out of the ladder")
    g.add_argument("--ubatch", type=int, default=64,
                   help="ubatch size the reference quality estimate replays frequent heads with (default 64)")
    g.add_argument("--robust-quantile", type=float, default=0.1,
                   help="quantile over prompts of the kept mass that must reach T (default 0.1)")
    g.add_argument("--no-quality", action="store_true", help="skip the reference KL/top-1 estimate")
    g.add_argument("--no-punct", action="store_true",
                   help="protect no punctuation tokens (baselines such as StreamingLLM keep none)")
    r = ap.add_argument_group("retrieval protection")
    r.add_argument("--no-retrieval", action="store_true",
                   help="skip the retrieval probes: policies from attention mass only (forgets needles)")
    r.add_argument("--probe-tokens", type=int, default=2048,
                   help="length of the held-aside needle prompts the protected set must answer (default 2048)")
    r.add_argument("--retrieval-margin", type=float, default=0.1,
                   help="mean answer log-prob the protected profile may lose against the full cache, "
                        "nats per token (default 0.1)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def check_args(a) -> None:
    if not a.model.is_dir():
        raise UsageError(f"{a.model} is not a directory; pass a Hugging Face model directory")
    if not (a.model / "config.json").is_file():
        raise UsageError(f"{a.model} has no config.json: not a Hugging Face model directory")
    try:
        json.loads((a.model / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{a.model / 'config.json'} is not readable JSON ({e})") from None
    if not a.profile:  # a stock conversion would drop them without a word
        given = [o for o, v in (("--policies", a.policies), ("--kv-budget", a.kv_budget), ("--threshold", a.threshold),
                                ("--calibration", a.calibration)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} only apply with --profile (without it the converter writes a "
                             f"stock GGUF with no fastgen policy); add --profile")
    if a.threshold is not None and a.kv_budget is not None:
        raise UsageError("--threshold and --kv-budget are two rules for the same choice; give one of them")
    if a.policies is not None and (a.threshold is not None or a.kv_budget is not None):
        log.warning("--policies gives every head's policy: %s chooses nothing (the report keeps its value)",
                    "--threshold" if a.threshold is not None else "--kv-budget")
    if a.threshold is None and a.kv_budget is None and a.policies is None:
        a.kv_budget = DEFAULT_KV_BUDGET
    if a.threshold is not None and not 0.0 < a.threshold <= 1.0:
        raise UsageError(f"--threshold must be in (0, 1], got {a.threshold}")
    if a.kv_budget is not None and not 0.0 < a.kv_budget <= 1.0:
        raise UsageError(f"--kv-budget must be a fraction in (0, 1], got {a.kv_budget}")
    if not 0.0 <= a.robust_quantile <= 1.0:
        raise UsageError(f"--robust-quantile must be in [0, 1], got {a.robust_quantile}")
    from llama_fastgen.schema import MAX_CELLS, MAX_N_SINK

    if a.max_tokens < 32:
        raise UsageError("--max-tokens must be >= 32")
    if not 0 <= a.n_sink <= MAX_N_SINK:
        raise UsageError(f"--n-sink must be in [0, {MAX_N_SINK}], got {a.n_sink}")
    if a.ctx < 256 or a.ubatch < 1:
        raise UsageError("--ctx must be >= 256 and --ubatch >= 1")
    if a.budget_ctx is None:
        a.budget_ctx = a.ctx // 2
    if not 0 <= a.budget_ctx <= MAX_CELLS:
        raise UsageError(f"--budget-ctx must be in [0, {MAX_CELLS}] (0: fixed budgets), got {a.budget_ctx}")
    if a.probe_tokens < 256 or a.retrieval_margin < 0:
        raise UsageError("--probe-tokens must be >= 256 and --retrieval-margin >= 0")
    if a.policies is not None:  # read before the model loads and profiles: a typo costs seconds, not minutes
        a.policy_report, a.policy_table = read_policies(a.policies, a.n_sink)
    if a.outfile.is_dir():
        raise UsageError(f"--outfile {a.outfile} is a directory; name the GGUF file to write")
    out_dir = a.outfile.resolve().parent
    if not out_dir.is_dir():
        raise UsageError(f"output directory {out_dir} does not exist")
    probe = out_dir / f".{a.outfile.name}.probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        raise UsageError(f"cannot write into {out_dir}") from None


def profile_and_convert(a) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llama_fastgen import schema as metadata

    from . import calibration, protect, reference, report, tokens
    from .architectures import check, permute_heads, shape
    from .profiling import allocate, arrange, profile, select, token_context

    try:
        config = AutoConfig.from_pretrained(a.model)
    except (OSError, ValueError) as e:  # a model_type this transformers does not know, a broken folder
        raise UsageError(f"transformers cannot read {a.model} ({e})") from None
    check(config)
    n_layer, n_head, n_kv, head_dim = shape(config)
    if a.policies:
        policies_for_model(a.policies, a.policy_table, n_layer, n_kv)
    max_pos = getattr(config, "max_position_embeddings", None)
    if not a.no_retrieval and max_pos and a.probe_tokens > max_pos:
        raise UsageError(f"--probe-tokens {a.probe_tokens} exceeds the model's context of {max_pos} tokens; "
                         f"pass --probe-tokens {max_pos} or less")
    try:
        texts = calibration.load_texts(a.calibration)
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tok = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"{a.model} has no tokenizer transformers can load ({e})") from None
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    log.info("loaded %s (%d layers, %d query / %d KV heads, head_dim %d) on %s in %.1f s",
             config.architectures[0], n_layer, n_head, n_kv, head_dim, device, time.time() - t0)

    special, punct = tokens.special_ids(tok), [] if a.no_punct else tokens.punct_ids(tok)
    prompts = [(n, calibration.to_token_ids(tok, n, t, a.max_tokens)) for n, t in texts]
    res = profile(model, prompts, set(special), set(punct), n_sink=a.n_sink, max_window=a.max_window,
                  progress=True)
    # (in budget mode the threshold rule at 0.95 only feeds the report's cross-prompt stability)
    sel = select(res, a.threshold or 0.95, n_kv, a.robust_quantile, n_ctx=a.ctx, frequent=not a.no_frequent)
    if a.kv_budget is not None:  # rungs by least damage within the budget; retrieval heads fixed full
        def policies_for(protected):
            return allocate(res, a.kv_budget, n_kv, n_ctx=a.ctx, frequent=not a.no_frequent,
                            fixed={x: protect.FULL for x in protected})
    else:                        # rungs by the threshold; retrieval heads raised to full
        base = sel.policies

        def policies_for(protected):
            return protect.with_protected(base, protected)
    protection = None
    if a.policies:
        sel.policies = a.policy_table
    else:
        try:
            sel.policies = policies_for([])
        except protect.BudgetTooSmall as e:
            raise UsageError(f"--kv-budget {a.kv_budget} is too small: {e}") from None
    if not a.policies and not a.no_retrieval:
        haystack = "\n\n".join(t for _, t in texts)
        protection = protect.run(model, tok, policies_for, set(special), set(punct), a.n_sink, haystack,
                                 probe_tokens=a.probe_tokens, chunks=a.ubatch, margin=a.retrieval_margin,
                                 log=log.info)
        sel.policies = protection.policies
        log.info("retrieval: %d KV heads kept full (%s)", len(protection.protected),
                 ", ".join(f"L{l}.{h} {protection.by_probe[(l, h)]}" for l, h in protection.protected) or "none")
    arrange(sel)

    quality = None
    if not a.no_quality:
        quality = {}
        for name, ids in prompts:
            ctx = token_context(ids, set(special), set(punct), a.n_sink)
            full = reference.logits(model, ids, None, None)
            comp = reference.logits(model, ids, sel.policies, ctx, chunks=a.ubatch)
            quality[name] = reference.compare(full, comp, start=len(ids) // 2)

    meta = metadata.FastgenMetadata(
        threshold=a.threshold or 0.0, n_sink=a.n_sink, classes=sel.classes,
        layer_class_heads=sel.layer_class_heads, head_perm=sel.perms,
        special_token_ids=special, punct_token_ids=punct, protected_frac=res.protected_frac,
        budget_ctx=a.budget_ctx,
        calibration={"prompts": res.prompt_names, "tokens": res.n_tokens,
                     "robust_quantile": a.robust_quantile, "stability": sel.stability()["same_as_offline"],
                     "retrieval_protected": None if protection is None else len(protection.protected),
                     "kv_budget": a.kv_budget})

    with tempfile.TemporaryDirectory(prefix="fastgen-permuted-") as tmpdir:
        tmp = Path(tmpdir) / a.model.resolve().name  # the converter names the model after its folder
        permute_heads(model, sel.perms)
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for extra in a.model.glob("*.model"):  # SentencePiece files the converter may want
            shutil.copy(extra, tmp)
        gguf_export.convert(tmp, a.outfile, a.outtype, extra_kv=meta.to_kv(), verbose=a.verbose)

    rep = report.build(sel, res, meta, head_dim, quality, a.outfile, protection)
    if a.policies:  # the table's provenance: its report's retrieval evidence (baselines rank heads by it)
        rep.update(policies_from=str(a.policies), retrieval=a.policy_report.get("retrieval"))
    import platform

    rep.update(threshold=a.threshold, kv_budget=a.kv_budget, ctx=a.ctx, budget_ctx=a.budget_ctx, command="llama-fastgen-convert " + " ".join(a.argv),
               machine=f"{platform.machine()}, {os.cpu_count()} cores, {device}",
               finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), seconds=round(time.time() - t0))
    stem = a.outfile.with_suffix("")
    report.write(rep, sel, Path(f"{stem}.fastgen.json"), Path(f"{stem}.fastgen.png"))
    return rep


def read_policies(path: Path, n_sink: int):
    """A report JSON and its 'policies' table: labels per layer and original KV head, as HeadPolicy,
    each one the native loader takes with these sinks."""

    from llama_fastgen.schema import HeadPolicy, MetadataError, class_problem

    try:
        report = json.loads(path.read_text())
        table = [[HeadPolicy.from_label(x) for x in row] for row in report["policies"]]
    except (OSError, ValueError, KeyError, TypeError, MetadataError) as e:
        raise UsageError(f"--policies {path}: not a report JSON with a 'policies' table ({e!r})") from None
    for p in dict.fromkeys(p for row in table for p in row):
        if (why := class_problem(p, n_sink)) is not None:
            raise UsageError(f"--policies {path}: {why} (n_sink {n_sink}); no GGUF could load it")
    return report, table


def policies_for_model(path: Path, table, n_layer: int, n_kv: int):
    """The table read from --policies, if it has the model's shape."""
    if len(table) != n_layer or any(len(row) != n_kv for row in table):
        raise UsageError(f"--policies {path}: {len(table)} layers x {len(table[0]) if table else 0} heads, "
                         f"the model has {n_layer} x {n_kv} KV heads")
    return table


def summary(rep: dict) -> str:
    from .report import rule as rule_of

    rule = rule_of(rep)
    if rep.get("budget_ctx"):
        rule += f"; windows and budgets grow beyond n_ctx {rep['budget_ctx']}"
    lines = [f"policies ({rule}): " +
             ", ".join(f"{k} {v}" for k, v in sorted(rep["policy_counts"].items(), key=lambda kv: -kv[1]))]
    for m in rep["expected_kv"]:
        lines.append(f"  KV at n_ctx {m['n_ctx']:>6}: {m['fastgen_bytes'] / 2**20:8.1f} MiB vs full "
                     f"{m['full_bytes'] / 2**20:8.1f} MiB ({m['ratio']:.0%})")
    if rep.get("retrieval"):
        rt = rep["retrieval"]
        lines.append(f"retrieval: {len(rt['protected'])} KV heads kept full by probe evidence; the reference "
                     f"answers held-aside needles {rt['answered'] if rt['answered'] is not None else '-'}"
                     f"/{rt['n_validation']} (full cache {rt['full_answered']})" + (f"; {rt['note']}" if rt["note"] else ""))
    st = rep["stability"]
    lines.append(f"cross-prompt stability: per-prompt choice equals the offline one for "
                 f"{st['same_as_offline']:.0%} of (prompt, head) pairs; cheaper {st['per_prompt_cheaper']:.0%}, "
                 f"dearer {st['per_prompt_dearer']:.0%}")
    if rep["reference_quality"]:
        for name, q in rep["reference_quality"].items():
            lines.append(f"  reference vs full on '{name}': KL {q['kl_mean']:.4f}, top-1 {q['top1']:.1%} "
                         f"({q['n']} positions)")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    from .architectures import UnsupportedModel

    try:
        check_args(a)
        if not a.profile:
            gguf_export.convert_stock(a.model, a.outfile, a.outtype)
            print(f"wrote {a.outfile} (stock conversion, no fastgen metadata)")
            return 0
        rep = profile_and_convert(a)
    except (UsageError, UnsupportedModel, gguf_export.ExportError) as e:
        print(f"llama-fastgen-convert: error: {e}", file=sys.stderr)
        return 2
    print(summary(rep))
    print(f"wrote {a.outfile}, {a.outfile.with_suffix('')}.fastgen.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
