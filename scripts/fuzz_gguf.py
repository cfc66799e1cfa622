#!/usr/bin/env python3
"""Fuzz the fastgen.* metadata of a GGUF: both loaders must accept or refuse each mutant alike.

The native loader (llama_cpp.Llama after `import llama_fastgen`) and the Python reader
(llama_fastgen.schema.read) load every mutant in worker processes, one batch per process. A load
must succeed on both sides with the same policy, or fail on both with a clean error (an
exception that says why), never a signal, an abort or a hang. tests/test_fuzz.py runs 500
mutants of this engine; this script runs as many as asked and prints a summary:

    python scripts/fuzz_gguf.py [--count 5000] [--seed 1234] [--gguf SMALL_F32_LLAMA.gguf]

Without --gguf it converts the tests' tiny random Llama (4 layers, 2 KV heads, the default
model's tokenizer). Mutants come from this module's own GGUF writer, so any key can hold any
type, length or value (empty arrays, values that wrap, duplicate keys, cut files).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The base keeps the first 512 tokens: gguf-py parses the full 49K tokens + merges in ~2.5 s per
# schema.read, which would make 500 reads take 20 minutes.
N_VOCAB = 512
N_CTX = 256

# ------------------------------------------------------------------------------------- GGUF I/O
# type name -> (GGUF type id, struct format); arrays are "<elem>[]" (GGUF type 9)
TYPES = {"u8": (0, "B"), "i8": (1, "b"), "u16": (2, "H"), "i16": (3, "h"), "u32": (4, "I"), "i32": (5, "i"),
         "f32": (6, "f"), "bool": (7, "?"), "str": (8, None), "u64": (10, "Q"), "i64": (11, "q"), "f64": (12, "d")}
NAMES = {tid: name for name, (tid, _) in TYPES.items()}
ARRAY = 9


def _enc(typ: str, v) -> bytes:
    if typ == "str":
        b = v if isinstance(v, bytes) else str(v).encode()
        return struct.pack("<Q", len(b)) + b
    return struct.pack("<" + TYPES[typ][1], v)


def _enc_kv(key: str, typ: str, v) -> bytes:
    if typ.endswith("[]"):
        elem = typ[:-2]
        head = struct.pack("<IIQ", ARRAY, TYPES[elem][0], len(v))
        return _enc("str", key) + head + b"".join(_enc(elem, x) for x in v)
    return _enc("str", key) + struct.pack("<I", TYPES[typ][0]) + _enc(typ, v)


class Base:
    """A GGUF as its non-fastgen KV pairs and tensors, to be written again with any fastgen.* KVs."""

    def __init__(self, path: Path, n_vocab: int | None = N_VOCAB):
        import gguf

        r = gguf.GGUFReader(str(path))
        self.kv: dict[str, tuple[str, object]] = {}
        for key, f in r.fields.items():
            if not key.startswith(("GGUF.", "fastgen.")):
                typ = NAMES[int(f.types[1])] + "[]" if f.types[0] == ARRAY else NAMES[int(f.types[0])]
                self.kv[key] = (typ, f.contents())
        self.tensors = [(t.name, [int(d) for d in t.field.parts[3]], int(t.tensor_type),
                         bytes(r.data[t.data_offset:t.data_offset + t.n_bytes])) for t in r.tensors]
        self.arch = self.kv["general.architecture"][1]
        if n_vocab:
            self._shrink_vocab(n_vocab)
        self.n_layer = int(self.kv[f"{self.arch}.block_count"][1])
        self.n_head_kv = int(self.kv[f"{self.arch}.attention.head_count_kv"][1])
        self.n_vocab = len(self.kv["tokenizer.ggml.tokens"][1])
        with tempfile.TemporaryDirectory() as d:
            self.size = self.write(Path(d) / "b.gguf", self.policy()).stat().st_size

    def _shrink_vocab(self, n: int) -> None:
        """Keep the first n tokens (a BPE vocabulary starts with its specials and byte alphabet), the
        merges among them and the matching rows of the (f32) embedding and output matrices."""
        keep = set(self.kv["tokenizer.ggml.tokens"][1][:n])
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in self.kv:
                self.kv[key] = (self.kv[key][0], self.kv[key][1][:n])
        if "tokenizer.ggml.merges" in self.kv:
            pairs = [(m, m.split(" ")) for m in self.kv["tokenizer.ggml.merges"][1]]
            self.kv["tokenizer.ggml.merges"] = ("str[]", [m for m, p in pairs if len(p) == 2 and
                                                          p[0] in keep and p[1] in keep and p[0] + p[1] in keep])
        if f"{self.arch}.vocab_size" in self.kv:
            self.kv[f"{self.arch}.vocab_size"] = ("u32", n)
        for i, (name, dims, typ, data) in enumerate(self.tensors):
            if name in ("token_embd.weight", "output.weight"):
                assert typ == 0, "shrinking the vocabulary needs f32 embeddings"
                self.tensors[i] = (name, [dims[0], n], typ, data[:dims[0] * n * 4])

    def policy(self) -> dict:
        return policy(self.n_layer, self.n_head_kv, self.n_vocab)

    def write(self, path: Path, fastgen: dict) -> Path:
        """This GGUF with `fastgen` ({key: (type, value)}, in order) as its fastgen.* pairs; a key
        written "key#dup" repeats key."""
        align = int(self.kv.get("general.alignment", ("u32", 32))[1])
        kvs = [_enc_kv(k, t, v) for k, (t, v) in self.kv.items()]
        kvs += [_enc_kv(k.split("#")[0], t, v) for k, (t, v) in fastgen.items()]
        infos, data = [], b""
        for name, dims, typ, blob in self.tensors:
            infos.append(_enc("str", name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, typ, len(data)))
            data += blob + b"\0" * (-len(blob) % align)
        head = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
        Path(path).write_bytes(head + b"\0" * (-len(head) % align) + data)
        return Path(path)


def policy(n_layer: int, n_head_kv: int, n_vocab: int) -> dict:
    """A valid policy that touches every rule: a full, a local and a frequent class, head counts
    that vary per layer, non-identity head permutations, protected token ids."""
    lch, perm = [], []
    for l in range(n_layer):
        cls = [(h + l) % 3 for h in range(n_head_kv)]          # class of original head h
        lch += [cls.count(c) for c in range(3)]
        perm += sorted(range(n_head_kv), key=lambda h: cls[h])  # stored position -> original head
    return {"fastgen.version": ("u32", 1), "fastgen.threshold": ("f32", 0.9), "fastgen.n_sink": ("u32", 4),
            "fastgen.protected_frac": ("f32", 0.1), "fastgen.class.kind": ("i32[]", [0, 3, 4]),
            "fastgen.class.window": ("i32[]", [0, 8, 8]), "fastgen.class.budget": ("i32[]", [0, 0, 64]),
            "fastgen.layer_class_heads": ("i32[]", lch), "fastgen.head_perm": ("i32[]", perm),
            "fastgen.special_token_ids": ("i32[]", [0, 1, 2]),
            "fastgen.punct_token_ids": ("i32[]", [17, 18, 28, 30, n_vocab - 1]),
            "fastgen.calibration": ("str", json.dumps({"prompts": ["fuzz"], "tokens": 1024})),
            "fastgen.budget_ctx": ("u32", 128)}


# ------------------------------------------------------------------------------------ mutations
INTS = [0, 1, -1, 2, 3, 4, 7, 8, 64, 65, 255, 256, 2**16, 2**16 + 1, 2**24, 2**24 + 1, 2**31 - 1, -2**31,
        2**32 - 1, 2**32, 2**63 - 1, -2**63, 10**30]
FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 1.0000001, -1e-9, 0.5, 1e30, -1e30, 1e-45]
STRINGS = ["", "{", "[]", "3", "null", '{"a": 1}', '{"tokens": NaN}', b"\xff\xfe not utf-8", "x" * 5000]
ALL = list(TYPES) + [t + "[]" for t in TYPES]      # every scalar type, and arrays of each


def fit(typ: str, v):
    """v as the file stores it in scalar type typ: integers wrap to the type's width like a C cast."""
    if typ == "str":
        return v if isinstance(v, (str, bytes)) else str(v)
    if isinstance(v, (str, bytes)):
        v = len(v)
    if typ in ("f32", "f64"):
        v = float(v)
        return math.copysign(math.inf, v) if typ == "f32" and math.isfinite(v) and abs(v) > 3.4e38 else v
    if typ == "bool":
        return bool(v)
    v = int(v) if math.isfinite(v) else 0
    bits = struct.calcsize(TYPES[typ][1]) * 8
    v %= 1 << bits
    return v - (1 << bits) if TYPES[typ][1].islower() and v >= 1 << (bits - 1) else v


def _short(v) -> str:
    if isinstance(v, list) and len(v) > 8:
        return f"[{', '.join(_short(x) for x in v[:6])}, ...] ({len(v)} entries)"
    r = repr(v)
    return r if len(r) <= 40 or not isinstance(v, (str, bytes)) else r[:30] + f"...' ({len(v)} chars)"


def _set(kv: dict, key: str, typ: str, v) -> str:
    v = [fit(typ[:-2], x) for x in v] if typ.endswith("[]") else fit(typ, v)
    kv[key] = (typ, v)
    return f"{key} = {typ} {_short(v)}"


def _retype(rng, kv, key, base):
    typ, v = kv[key]
    new = rng.choice([t for t in ALL if t != typ])
    if new.endswith("[]"):
        return _set(kv, key, new, v if isinstance(v, list) else [v])
    return _set(kv, key, new, (v[0] if v else 0) if isinstance(v, list) else v)


def _resize(rng, kv, key, base):
    typ, v = kv[key]
    if not typ.endswith("[]"):
        return _retype(rng, kv, key, base)

    def fill(n):  # entries like the old ones or small numbers
        return [rng.choice(v) if v and rng.random() < 0.5 else rng.choice(INTS[:12]) for _ in range(n)]

    return _set(kv, key, typ, rng.choice([[], v[:-1], v[1:], v + fill(1), v + v, fill(65), fill(1000)]))


def _extreme(rng, kv, key, base):
    typ, v = kv[key]
    elem = typ.removesuffix("[]")
    x = rng.choice(FLOATS if elem in ("f32", "f64") else STRINGS if elem == "str" else INTS)
    if typ.endswith("[]"):
        v = list(v) or [x]
        v[rng.randrange(len(v))] = x
    return _set(kv, key, typ, v if typ.endswith("[]") else x)


def _delete(rng, kv, key, base):
    del kv[key]
    return f"delete {key}"


def _unknown(rng, kv, key, base):
    """A fastgen.* key that no loader reads."""
    name = rng.choice(["fastgen.extra", "fastgen.class.extra", "fastgen.enable", "fastgen.", "fastgen.version2",
                       "fastgen.class.kind.x", "fastgen.\u00e9t\u00e9"])
    typ = rng.choice(ALL)
    return "add " + _set(kv, name, typ, [1, 2, 3] if typ.endswith("[]") else rng.choice(INTS[:8] + STRINGS))


def _duplicate(rng, kv, key, base):
    kv[key + "#dup"] = kv[key]
    return f"duplicate {key}"


def _aimed(rng, kv, key, base):
    """A value aimed at one rule of the schema (boundaries, wrapping sums, non-permutations)."""
    L, n_vocab = base.n_layer, base.n_vocab
    cases = {
        "fastgen.version": ("u32", [0, 2, 2**32 - 1]),
        "fastgen.n_sink": ("u32", [0, 55, 56, 2**16, 2**16 + 1, 2**32 - 1]),   # 56 + window 8 = budget 64
        "fastgen.threshold": ("f32", FLOATS),
        "fastgen.protected_frac": ("f32", FLOATS),
        "fastgen.class.kind": ("i32[]", [[0, 4, 3], [4, 0, 4], [5, 3, 4], [-1, 3, 4], [0, 0, 0], [4, 4, 4], [1, 2, 4],
                                         [0, 3, 2**31 - 1]]),
        "fastgen.class.window": ("i32[]", [[1, 8, 8], [0, 0, 8], [0, 8, 0], [0, 2**24, 8], [0, 2**24 + 1, 8],
                                           [0, -8, 8], [0, 8, 59], [0, 8, 60]]),
        "fastgen.class.budget": ("i32[]", [[0, 0, 12], [0, 0, 13], [0, 0, 2**24], [0, 0, 2**24 + 1], [0, 0, -1],
                                           [0, 1, 64], [64, 0, 64], [0, 0, 0]]),
        "fastgen.layer_class_heads": ("i32[]", [r * L for r in ([2**31 - 1, 2**31 - 1, 4], [3, -1, 0], [2, 0, 0],
                                                                [0, 0, 2], [1, 1, 1], [-2**31, 2**31 - 1, 3])]),
        "fastgen.head_perm": ("i32[]", [r * L for r in ([0, 0], [1, 1], [0, 2], [-1, 0], [1, 0], [0, 2**31 - 1])]),
        "fastgen.special_token_ids": ("i32[]", [[0, t] for t in (n_vocab - 1, n_vocab, -1, 2**31 - 1, 49151)]),
        "fastgen.punct_token_ids": ("i32[]", [[17, t] for t in (n_vocab - 1, n_vocab, -1, -2**31, 10**6)]),
        "fastgen.calibration": ("str", STRINGS),
        "fastgen.budget_ctx": ("u32", [0, 1, 7, 2**24, 2**24 + 1, 2**32 - 1]),
    }
    if key not in cases:
        return _extreme(rng, kv, key, base)
    typ, values = cases[key]
    return _set(kv, key, typ, rng.choice(values))


OPS = [(_retype, 3), (_resize, 3), (_extreme, 4), (_delete, 2), (_unknown, 2), (_duplicate, 0.5), (_aimed, 6)]


def mutate(rng: random.Random, base: Base) -> dict:
    """One mutant: {"desc": what was done, "kv": the fastgen pairs, "container_ok"} or, for a cut
    file, {"desc", "cut": bytes of the valid file kept, "container_ok"}. container_ok is False when
    the GGUF itself is broken (cut, duplicate key): refused before any fastgen rule is read."""
    if rng.random() < 0.03:
        # half the cuts inside the KV pairs, where a parser walks lengths
        cut = rng.randrange(base.size // 20) if rng.random() < 0.5 else rng.randrange(base.size)
        return {"desc": f"cut the file at byte {cut} of {base.size}", "cut": cut, "container_ok": False}
    kv, descs = base.policy(), []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        keys = [k for k in kv if "#" not in k]
        if keys:
            op = rng.choices([o for o, _ in OPS], weights=[w for _, w in OPS])[0]
            descs.append(op(rng, kv, rng.choice(keys), base))
    if rng.random() < 0.1:  # the order of the pairs must not matter
        kv = dict(rng.sample(list(kv.items()), len(kv)))
        descs.append("shuffle the pairs")
    return {"desc": "; ".join(descs), "kv": kv, "container_ok": not any("#" in k for k in kv)}


def mutants(base: Base, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": i, **mutate(rng, base)} for i in range(count)]


def write_mutant(base: Base, m: dict, path: Path) -> Path:
    if "cut" in m:
        base.write(path, base.policy())
        with open(path, "r+b") as f:
            f.truncate(m["cut"])
        return path
    return base.write(path, m["kv"])


# -------------------------------------------------------------------------------------- loading
def _load_one(path: str) -> dict:
    """Both loaders on one file, in this (worker) process."""
    import llama_fastgen  # first: points llama_cpp at our libllama
    from llama_cpp import Llama
    from llama_fastgen import schema

    rec, meta = {}, None
    try:
        meta = schema.read(path)
        rec["py"] = "ok"
        if meta is not None:  # classes with heads (the native stats list those only)
            used = [any(row[c] for row in meta.layer_class_heads) for c in range(len(meta.classes))]
            # the labels a cache of N_CTX runs: sizes grown when N_CTX > budget_ctx
            rec["py_classes"] = [cls.label for cls, u in zip(meta.at_context(N_CTX).classes, used) if u]
    except Exception as e:  # noqa: BLE001  (the judge decides whether the exception is a clean one)
        rec["py"], rec["py_err"] = "refused", f"{type(e).__name__}: {e}"[:400]
    try:
        llm = Llama(model_path=path, n_ctx=N_CTX, verbose=False)
        try:
            assert llm.n_ctx() == N_CTX, "N_CTX must be a size llama.cpp does not pad"
            st = llama_fastgen.native.cache_stats(llm)
            n_ubatch = llm.context_params.n_ubatch
        finally:
            llm.close()
        rec["native"] = "ok"
        rec["native_classes"] = [c["class"] for c in st["classes"]] if st["fastgen"] else None
        if meta is not None:  # what the schema's byte formula predicts for what was allocated
            rec["kv_bytes"], rec["py_kv_bytes"] = st["kv_bytes"], sum(schema.kv_bytes(meta, 8, N_CTX, n_ubatch))
    except Exception as e:  # noqa: BLE001
        rec["native"], rec["native_err"] = "refused", f"{type(e).__name__}: {e}"[:400]
    for k in ("py_err", "native_err"):  # the file name is enough in a report
        if k in rec:
            rec[k] = rec[k].replace(str(Path(path).parent) + os.sep, "")
    return rec


def worker(list_file: str) -> int:
    """Load each (id, path) of the list, one JSON line per file, flushed: a worker that dies has
    said how far it got."""
    for mid, path in json.loads(Path(list_file).read_text()):
        print(json.dumps({"id": mid, **_load_one(path)}), flush=True)
    return 0


def _run_worker(items: list, timeout: float, tmp: Path) -> tuple[list[dict], str | None]:
    """(records, None), or (the records it printed, why it stopped early)."""
    lst = tmp / f"list-{items[0][0]}.json"
    lst.write_text(json.dumps(items))
    p = subprocess.Popen([sys.executable, __file__, "--worker", str(lst)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
        why = None if rc == 0 else f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        why = f"no answer within {timeout:.0f} s"
    if why and err.strip():
        why += ": " + " | ".join(err.strip().splitlines()[-3:])
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], why


def run(base: Base, muts: list[dict], tmp: Path, batch: int = 50, timeout: float = 60) -> list[dict]:
    """Every mutant with its verdicts. When a worker dies or hangs, the rest of its batch is loaded
    again one file per process, which names the mutant that kills a process."""
    out = []
    for b0 in range(0, len(muts), batch):
        chunk = muts[b0:b0 + batch]
        items = [(m["id"], str(write_mutant(base, m, tmp / f"m{m['id']}.gguf"))) for m in chunk]
        recs, why = _run_worker(items, timeout, tmp)
        if why:
            for i, (mid, path) in enumerate(items[len(recs):]):
                one, why1 = _run_worker([(mid, path)], timeout, tmp)
                rec = one[0] if one else {"id": mid, "crash": why1}
                if i == 0 and one:  # died in the batch, not alone: still a crash, found on this file
                    rec["crash"] = f"{why} (in a batch; alone it loaded)"
                recs.append(rec)
        by_id = {r["id"]: r for r in recs}
        out += [{**m, **by_id[m["id"]]} for m in chunk]
        for _, path in items:
            os.unlink(path)
    return out


# -------------------------------------------------------------------------------------- judging
def problems(rec: dict) -> list[str]:
    """What is wrong with one mutant's loads; empty when both refused cleanly or both accepted
    the same policy."""
    if "crash" in rec:
        return [f"a process died: {rec['crash']}"]
    bad = []
    if rec["py"] != rec["native"]:
        bad.append(f"the loaders disagree: python {rec['py']} {rec.get('py_err', '')}; "
                   f"native {rec['native']} {rec.get('native_err', '')}")
    if rec["native"] == "refused":
        if not rec["native_err"].startswith(("ValueError", "RuntimeError")):
            bad.append(f"the native load raised {rec['native_err']}")
        elif rec["container_ok"] and "fastgen" not in rec["native_err"]:   # llama_fastgen_last_error was empty
            bad.append(f"the native refusal does not say why: {rec['native_err']}")
    if rec["py"] == "refused" and rec["container_ok"] and not rec["py_err"].startswith("MetadataError"):
        bad.append(f"the python reader raised {rec['py_err']}, not a MetadataError")
    if rec["py"] == rec["native"] == "ok":
        if rec.get("py_classes") != rec.get("native_classes"):
            bad.append(f"the policies differ: python {rec.get('py_classes')}, native {rec.get('native_classes')}")
        elif rec.get("kv_bytes") != rec.get("py_kv_bytes"):
            bad.append(f"native allocated {rec['kv_bytes']} KV bytes, schema.kv_bytes says {rec['py_kv_bytes']}")
    return bad


def _rule(problem: str) -> str:
    """A problem without its numbers and file name: mutants that broke the same rule group together."""
    problem = re.sub(r"m\d+\.gguf: ", "", problem)
    return re.sub(r"\[[^]]*\]", "[..]", re.sub(r"(?<![\w-])-?\d+", "N", problem))


def summary(recs: list[dict], show: int = 40) -> str:
    """Verdict counts, problems grouped by rule, then the first `show` problem mutants in full."""
    verdicts = Counter("crash" if "crash" in r else f"python {r['py']:<7}  native {r['native']}" for r in recs)
    lines = [f"{n:>6}  {k}" for k, n in sorted(verdicts.items())]
    bad = [r for r in recs if problems(r)]
    lines.append(f"{len(bad):>6}  with a problem" + (":" if bad else ""))
    rules = Counter(_rule(p) for r in bad for p in problems(r))
    lines += [f"{n:>10}  {rule}" for rule, n in rules.most_common()]
    for r in bad[:show]:
        lines += [f"  #{r['id']}: {r['desc']}"] + [f"      {p}" for p in problems(r)]
    return "\n".join(lines)


def tiny_gguf(workdir: Path) -> Path:
    """The tests' tiny random GQA Llama (tests/conftest.py tiny_model_dir), converted to f32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llama_fastgen.converter import gguf_export

    model_dir = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py")],
                               capture_output=True, text=True, check=True).stdout.strip()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(workdir / "tiny")
    tok.save_pretrained(workdir / "tiny")
    return gguf_export.convert(workdir / "tiny", workdir / "tiny.gguf", "f32")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gguf", type=Path, help="small llama GGUF with f32 embeddings (default: the tiny test model)")
    ap.add_argument("--show", type=int, default=40, help="problems listed in full")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        base = Base(a.gguf or tiny_gguf(Path(d)))
        recs = run(base, mutants(base, a.count, a.seed), Path(d))
    print(summary(recs, a.show))
    print(f"{len(recs)} mutants, seed {a.seed}, {time.time() - t0:.0f} s")
    return 1 if any(problems(r) for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main())
