"""The fastgen.* GGUF metadata schema (version 1): the policy types, writing, reading, validation.

Torch-free: the runtime (inspect, chat) reads it without the converter's dependencies.

Keys (heads already permuted so that each layer's classes are contiguous, in class order):
  fastgen.version              u32    schema version (1)
  fastgen.threshold            f32    recovery threshold T used to choose policies (0: a KV budget chose them)
  fastgen.n_sink               u32    attention sinks (first positions) kept by every compressed class
  fastgen.class.kind           i32[C] 0 full, 1 special, 2 special+punct, 3 special+punct+local,
                                      4 frequent (special + heavy hitters + window, fixed budget)
  fastgen.class.window         i32[C] recent window in positions (0 for full, 1 = the query itself)
  fastgen.class.budget         i32[C] frequent: cells per head between evictions (> n_sink + window);
                                      0 for other kinds; optional when no class is frequent
  fastgen.layer_class_heads    i32[L*C] KV heads of class c in layer l, at [l*C + c]
  fastgen.head_perm            i32[L*H_kv] original KV head at new position h of layer l
  fastgen.special_token_ids    i32[]  protected by every compressed class
  fastgen.punct_token_ids      i32[]  protected by special+punct classes
  fastgen.protected_frac       f32    share of calibration tokens that are special or punctuation
  fastgen.calibration          str    JSON summary of the calibration run
  fastgen.budget_ctx           u32    optional: the n_ctx the windows and budgets were sized for; a
                                      larger context grows them by n_ctx / budget_ctx (HeadPolicy.at_context)
Unknown keys are ignored by stock llama.cpp, so a fastgen GGUF still loads there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from enum import IntEnum

from . import contract, headers

_C = headers.contract()   # what the native cache is compiled with (llama-fastgen-contract.h)
PREFIX = _C["KEY_PREFIX"]
# the GGUF keys, by the header's names without KEY_: KEYS["CLASS_KIND"] == "fastgen.class.kind"
KEYS = {k[4:]: v for k, v in _C.items() if k.startswith("KEY_") and k != "KEY_PREFIX"}
# Llama(kv_overrides=...) that runs a fastgen GGUF with llama.cpp's own cache: the baseline of every comparison
STOCK_CACHE = {KEYS["ENABLE"]: False}


class MetadataError(ValueError):
    pass


class Kind(IntEnum):
    """fastgen.class.kind values."""

    FULL = _C["KIND_FULL"]
    SPECIAL = _C["KIND_SPECIAL"]                          # sinks + special tokens (+ the query itself)
    SPECIAL_PUNCT = _C["KIND_SPECIAL_PUNCT"]              # ... + punctuation
    SPECIAL_PUNCT_LOCAL = _C["KIND_SPECIAL_PUNCT_LOCAL"]  # ... + a recent window
    FREQUENT = _C["KIND_FREQUENT"]                        # sinks + special + window + heavy hitters, `budget` cells per head


# labels as the native cache prints them (the header's LABEL_<kind>); special+punct+local adds its window,
# special+frequent its budget and "+local" + window
KIND_NAMES = {k: _C[f"LABEL_{k.name}"] for k in Kind}
assert len(KIND_NAMES) == _C["N_KINDS"]

# a frequent class evicts once it holds budget + this many cells; upper bounds for strangers' GGUFs
FREQUENT_EVICT_BATCH, HH_POS_PAD = _C["FREQUENT_EVICT_BATCH"], _C["HH_POS_PAD"]
MAX_CLASSES, MAX_N_SINK, MAX_CELLS = _C["MAX_CLASSES"], _C["MAX_N_SINK"], _C["MAX_CELLS"]
SCHEMA_VERSION = _C["SCHEMA_VERSION"]
SLICE_PAD = _C["SLICE_PAD"]   # a class slice's cells are a multiple of this
DEFAULT_N_SINK = 4            # attention sinks a compressed head keeps unless convert.py --n-sink says otherwise


@dataclass(frozen=True, order=True)
class HeadPolicy:
    """What one KV head keeps. `window` is 1 for special and special+punct (the query itself);
    `budget` is the frequent kind's cells per head (sinks, special tokens, window, heavy hitters)."""

    kind: Kind
    window: int = 0
    budget: int = 0

    @property
    def label(self) -> str:
        if self.kind == Kind.SPECIAL_PUNCT_LOCAL:
            return f"{KIND_NAMES[self.kind]}{self.window}"
        if self.kind == Kind.FREQUENT:
            return f"{KIND_NAMES[self.kind]}{self.budget}+local{self.window}"
        return KIND_NAMES[self.kind]

    @classmethod
    def from_label(cls, label: str) -> "HeadPolicy":
        """Inverse of `label` ('full', 'special+punct+local128', 'special+frequent512+local128', ...)."""
        import re

        name = {k: re.escape(v) for k, v in KIND_NAMES.items()}
        m = re.fullmatch(rf"{name[Kind.FREQUENT]}(\d+)\+local(\d+)", label)
        if m:
            return cls(Kind.FREQUENT, int(m.group(2)), int(m.group(1)))
        m = re.fullmatch(rf"{name[Kind.SPECIAL_PUNCT_LOCAL]}(\d+)", label)
        if m:
            return cls(Kind.SPECIAL_PUNCT_LOCAL, int(m.group(1)))
        simple = {KIND_NAMES[Kind.FULL]: cls(Kind.FULL), KIND_NAMES[Kind.SPECIAL]: cls(Kind.SPECIAL, 1),
                  KIND_NAMES[Kind.SPECIAL_PUNCT]: cls(Kind.SPECIAL_PUNCT, 1)}
        if label not in simple:
            raise MetadataError(f"unknown policy label {label!r}; expected {', '.join(simple)}, "
                                f"{KIND_NAMES[Kind.SPECIAL_PUNCT_LOCAL]}<W> or {KIND_NAMES[Kind.FREQUENT]}<B>+local<W>")
        return simple[label]

    def cost(self, n_ctx: int, protected_frac: float, n_sink: int) -> float:
        """Expected cached tokens at context n_ctx (protected_frac: share of special+punct tokens)."""
        if self.kind == Kind.FULL:
            return float(n_ctx)
        if self.kind == Kind.FREQUENT:
            return float(min(n_ctx, self.budget))
        protected = protected_frac * n_ctx if self.kind != Kind.SPECIAL else 0.0
        return min(float(n_ctx), n_sink + protected + self.window)

    def at_context(self, n_ctx: int, budget_ctx: int, n_sink: int) -> "HeadPolicy":
        """What this head keeps in a cache of n_ctx cells (the native rule, contract.class_at_context):
        windows and frequent budgets grow by n_ctx / budget_ctx above budget_ctx, so a head keeps the
        same share of a longer context."""
        w, b = contract.class_at_context(int(self.kind), self.window, self.budget, n_sink, n_ctx, budget_ctx)
        return self if (w, b) == (self.window, self.budget) else HeadPolicy(self.kind, w, b)


def class_problem(c: HeadPolicy, n_sink: int) -> str | None:
    """Why the native loader refuses this class (contract.class_problem, the rule it runs), or None; the
    converter asks before it writes, so it never writes a GGUF that cannot load."""
    if not all(0 <= v <= MAX_CELLS for v in (c.window, c.budget)):   # (also what no int32 holds)
        return f"class {c.label}: windows and budgets are 0 to {MAX_CELLS}"
    why = contract.class_problem(int(c.kind), c.window, c.budget, n_sink)
    return {0: None, _C["CLASS_BAD_KIND"]: f"class kind {int(c.kind)} is unknown",
            _C["CLASS_BAD_WINDOW"]: f"class {c.label}: the window is 0 for full classes, otherwise 1 to {MAX_CELLS}",
            _C["CLASS_BAD_BUDGET"]: f"class {c.label}: a frequent budget must exceed n_sink + window = {n_sink + c.window} "
                                    f"and be at most {MAX_CELLS}",
            _C["CLASS_STRAY_BUDGET"]: f"class {c.label} has a budget; only frequent classes have one"}[why]


def class_order(p: HeadPolicy):
    """Full first, then shrinking windows: the order of classes in the GGUF and of heads in a layer
    (frequent classes last and consecutive: the native heavy-hitter store takes them as one range)."""
    return (p.kind != Kind.FULL, p.kind == Kind.FREQUENT, -p.window, -p.budget, -int(p.kind))


def add_to_writer(writer, kv: dict[str, tuple[str, object]], gguf) -> None:
    """Write {key: (type, value)} (FastgenMetadata.to_kv, or test overrides) into a gguf-py
    GGUFWriter; `gguf` is the gguf-py module the writer comes from (the pinned tree's, in the
    converter's subprocess). Every fastgen GGUF writer goes through here."""
    T = gguf.GGUFValueType
    scalar = {"u32": T.UINT32, "f32": T.FLOAT32, "str": T.STRING}
    for key, (typ, val) in kv.items():
        if typ == "i32[]":
            writer.add_key_value(key, [int(v) for v in val], T.ARRAY, sub_type=T.INT32)
        elif typ in scalar:
            writer.add_key_value(key, val, scalar[typ])
        else:
            raise MetadataError(f"{key}: unknown value type {typ!r} (u32, f32, str or i32[])")


@dataclass
class FastgenMetadata:
    threshold: float
    n_sink: int
    classes: list[HeadPolicy]                 # class order: full first, then by shrinking window
    layer_class_heads: list[list[int]]        # [L][C]
    head_perm: list[list[int]]                # [L][H_kv]
    special_token_ids: list[int]
    punct_token_ids: list[int]
    protected_frac: float
    calibration: dict = field(default_factory=dict)
    version: int = SCHEMA_VERSION
    budget_ctx: int = 0                        # 0: windows and budgets fixed at every n_ctx

    def at_context(self, n_ctx: int) -> "FastgenMetadata":
        """The policy table a native cache of n_ctx cells runs (see HeadPolicy.at_context)."""
        from dataclasses import replace

        return replace(self, classes=[c.at_context(n_ctx, self.budget_ctx, self.n_sink) for c in self.classes])

    @property
    def n_layer(self) -> int:
        return len(self.layer_class_heads)

    def head_policies(self) -> list[list[HeadPolicy]]:
        """Per layer, the policy of each KV head in permuted (stored) order."""
        out = []
        for counts in self.layer_class_heads:
            row: list[HeadPolicy] = []
            for cls, n in zip(self.classes, counts):
                row += [cls] * n
            out.append(row)
        return out

    def original_head_policies(self) -> list[list[HeadPolicy]]:
        """Per layer, the policy of each KV head in the original (unpermuted HF) order."""
        out = []
        for perm, row in zip(self.head_perm, self.head_policies()):
            orig: list[HeadPolicy] = [row[0]] * len(row)
            for h, p in enumerate(row):
                orig[perm[h]] = p
            out.append(orig)
        return out

    def to_kv(self) -> dict[str, tuple[str, object]]:
        """{key: (type, value)} with type in u32/f32/str/i32[] (what gguf_export writes)."""
        kv = {
            KEYS["VERSION"]: ("u32", self.version),
            KEYS["THRESHOLD"]: ("f32", float(self.threshold)),
            KEYS["N_SINK"]: ("u32", int(self.n_sink)),
            KEYS["CLASS_KIND"]: ("i32[]", [int(c.kind) for c in self.classes]),
            KEYS["CLASS_WINDOW"]: ("i32[]", [int(c.window) for c in self.classes]),
            KEYS["CLASS_BUDGET"]: ("i32[]", [int(c.budget) for c in self.classes]),
            KEYS["LAYER_CLASS_HEADS"]: ("i32[]", [n for row in self.layer_class_heads for n in row]),
            KEYS["HEAD_PERM"]: ("i32[]", [h for row in self.head_perm for h in row]),
            KEYS["SPECIAL_TOKEN_IDS"]: ("i32[]", [int(t) for t in self.special_token_ids]),
            KEYS["PUNCT_TOKEN_IDS"]: ("i32[]", [int(t) for t in self.punct_token_ids]),
            KEYS["PROTECTED_FRAC"]: ("f32", float(self.protected_frac)),
            KEYS["CALIBRATION"]: ("str", json.dumps(self.calibration, sort_keys=True)),
        }
        if self.budget_ctx:
            kv[KEYS["BUDGET_CTX"]] = ("u32", int(self.budget_ctx))
        # GGUF has no empty arrays: an empty token list is simply left out (the keys are optional)
        return {k: v for k, v in kv.items() if not (v[0] == "i32[]" and not v[1])}


def read(path: str | Path) -> FastgenMetadata | None:
    """Read and validate fastgen.* keys of a GGUF; None when it has none. Refuses what the native
    loader (llama_fastgen_policy::load and the cache it builds) refuses, with a MetadataError."""
    import gguf

    T = gguf.GGUFValueType
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises whatever a cut or foreign file trips (IndexError, ValueError, ...)
        raise MetadataError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = {k: f for k, f in r.fields.items() if k.startswith(PREFIX)}
    if not fields:
        return None

    def get(name, want, required=True):
        key = KEYS[name]
        f = fields.get(key)
        if f is None:
            if required:
                raise MetadataError(f"{path}: missing key {key}")
            return None
        # types as stored: an empty array has no element in f.types, its element type is parts[3]
        got = (T.ARRAY, T(int(f.parts[3][0]))) if f.types[0] == T.ARRAY else (f.types[0],)
        if got != want:
            raise MetadataError(f"{path}: {key} has type {'/'.join(t.name for t in got)}, "
                                f"expected {'/'.join(t.name for t in want)}")
        try:
            return f.contents()
        except UnicodeDecodeError:   # the one text key (calibration) is for people; native takes any bytes
            return bytes(f.parts[-1]).decode("utf-8", "replace")

    U32, F32, STR, I32S = (T.UINT32,), (T.FLOAT32,), (T.STRING,), (T.ARRAY, T.INT32)
    version = get("VERSION", U32)
    if version != SCHEMA_VERSION:
        raise MetadataError(f"{path}: {KEYS['VERSION']} is {version}, this llama-fastgen reads "
                            f"version {SCHEMA_VERSION}; re-run convert.py --profile")
    kinds, windows = get("CLASS_KIND", I32S), get("CLASS_WINDOW", I32S)
    if len(kinds) > MAX_CLASSES:
        raise MetadataError(f"{path}: {KEYS['CLASS_KIND']} has {len(kinds)} classes, at most {MAX_CLASSES} are allowed")
    budgets = get("CLASS_BUDGET", I32S, False) or [0] * len(kinds)
    if not kinds or not len(kinds) == len(windows) == len(budgets):
        raise MetadataError(f"{path}: {KEYS['CLASS_KIND']}, class.window and class.budget differ in length or are empty")
    try:
        classes = [HeadPolicy(Kind(k), int(w), int(b)) for k, w, b in zip(kinds, windows, budgets)]
    except ValueError as e:
        raise MetadataError(f"{path}: {KEYS['CLASS_KIND']} holds an unknown class id ({e})") from None
    n_sink = int(get("N_SINK", U32))
    if n_sink > MAX_N_SINK:
        raise MetadataError(f"{path}: {KEYS['N_SINK']} = {n_sink} exceeds {MAX_N_SINK}")
    for c in classes:
        if (why := class_problem(c, n_sink)) is not None:
            raise MetadataError(f"{path}: {why}; re-run convert.py --profile")
    frequent = [i for i, c in enumerate(classes) if c.kind == Kind.FREQUENT]
    if frequent and frequent[-1] - frequent[0] != len(frequent) - 1:
        raise MetadataError(f"{path}: frequent classes must be consecutive in {KEYS['CLASS_KIND']} "
                            f"(their heads share one store)")
    budget_ctx = int(get("BUDGET_CTX", U32, False) or 0)
    if KEYS["BUDGET_CTX"] in fields and not 1 <= budget_ctx <= MAX_CELLS:
        raise MetadataError(f"{path}: {KEYS['BUDGET_CTX']} = {budget_ctx} must be in [1, {MAX_CELLS}]; "
                            f"re-run convert.py --profile")
    protected_frac = float(get("PROTECTED_FRAC", F32))
    if not 0.0 <= protected_frac <= 1.0:
        raise MetadataError(f"{path}: {KEYS['PROTECTED_FRAC']} = {protected_frac} must be in [0, 1]")
    n_layer = arch_int(r, "block_count", path)
    n_head_kv = arch_int(r, "attention.head_count_kv", path)
    lch, perm = get("LAYER_CLASS_HEADS", I32S), get("HEAD_PERM", I32S)
    C = len(classes)
    if len(lch) != n_layer * C:
        raise MetadataError(f"{path}: {KEYS['LAYER_CLASS_HEADS']} has {len(lch)} entries, "
                            f"expected n_layer*n_class = {n_layer}*{C}")
    rows = [list(lch[l * C:(l + 1) * C]) for l in range(n_layer)]
    for l, row in enumerate(rows):
        if sum(row) != n_head_kv or min(row) < 0 or max(row) > n_head_kv:
            raise MetadataError(f"{path}: {KEYS['LAYER_CLASS_HEADS']} of layer {l} sums to {sum(row)}, "
                                f"the model has {n_head_kv} KV heads")
    if len(perm) != n_layer * n_head_kv:
        raise MetadataError(f"{path}: {KEYS['HEAD_PERM']} has {len(perm)} entries, expected {n_layer * n_head_kv}")
    perms = [list(perm[l * n_head_kv:(l + 1) * n_head_kv]) for l in range(n_layer)]
    for l, p in enumerate(perms):
        if sorted(p) != list(range(n_head_kv)):
            raise MetadataError(f"{path}: {KEYS['HEAD_PERM']} of layer {l} is {p}, not a permutation of the "
                                f"{n_head_kv} KV heads")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    ids = {}
    for name in ("SPECIAL_TOKEN_IDS", "PUNCT_TOKEN_IDS"):
        ids[name] = [int(t) for t in get(name, I32S, False) or []]
        if any(not 0 <= t < n_vocab for t in ids[name]):
            raise MetadataError(f"{path}: {KEYS[name]} holds a token id outside the vocabulary ({n_vocab})")
    # a summary for people, not part of the policy: a string (native checks the same), kept as text
    # when it is not a JSON object
    text = get("CALIBRATION", STR, False) or "{}"
    try:
        calibration = json.loads(text)
    except ValueError:
        calibration = None
    if not isinstance(calibration, dict):
        calibration = {"unparsed": text[:1000]}
    return FastgenMetadata(
        threshold=float(get("THRESHOLD", F32)), n_sink=n_sink, classes=classes, layer_class_heads=rows,
        head_perm=perms, special_token_ids=ids["SPECIAL_TOKEN_IDS"], punct_token_ids=ids["PUNCT_TOKEN_IDS"],
        protected_frac=protected_frac, calibration=calibration, version=version, budget_ctx=budget_ctx)


def arch_int(reader, suffix: str, path="GGUF", default: int | None = None) -> int:
    """A positive model key ({arch}.{suffix}) of a GGUF, or `default` where it is absent; a
    MetadataError names what is missing or wrong."""
    f = reader.fields.get("general.architecture")
    if f is None:
        raise MetadataError(f"{path} has no general.architecture: not a complete model file; convert it again")
    arch = f.contents()
    f = reader.fields.get(f"{arch}.{suffix}")
    if f is None:
        if default is not None:
            return default
        raise MetadataError(f"{path} has no {arch}.{suffix}: not a complete model file; convert it again")
    v = f.contents()
    if isinstance(v, list):  # per-layer arrays: every layer must agree for now
        if len(set(v)) != 1:
            raise MetadataError(f"{path}: {arch}.{suffix} varies per layer; not supported")
        v = v[0]
    if not isinstance(v, int) or v <= 0:
        raise MetadataError(f"{path}: {arch}.{suffix} = {v!r}, expected a positive integer; convert it again")
    return v


def class_capacity(meta: FastgenMetadata, c: int, n_ctx: int, n_ubatch: int, n_seq: int = 1) -> int:
    """Cells the native cache allocates for class c at n_ctx (contract.class_cells, on the policy that
    context runs); n_seq is the number of sequences sharing the cells (a unified cache), else 1.
    Frequent classes share one store whose heads all get the largest of their capacities."""
    meta = meta.at_context(n_ctx)

    def cells(cls, n):
        return contract.class_cells(int(cls.kind), cls.window, cls.budget, meta.n_sink, meta.protected_frac, n_ctx, n_ubatch, n)
    if meta.classes[c].kind == Kind.FREQUENT:
        return max(cells(f, 1) for f in meta.classes if f.kind == Kind.FREQUENT)
    return cells(meta.classes[c], n_seq)


def kv_bytes(meta: FastgenMetadata, head_dim: int, n_ctx: int, n_ubatch: int, bytes_per_elem: int = 2,
             n_seq: int = 1, unified: bool = True, undo_tokens: int = 0) -> list[int]:
    """Allocated bytes per class (f16 by default): cells x heads over layers x head_dim x 2 (K and V);
    frequent classes add an F32 score and an F32 position per cell and head (the mask stays on the
    device) plus HH_POS_PAD floats per head (the padding of the positions: the CUDA kernel's
    counters and bound), and keep f16 K/V under a quantized cache. n_seq sequences: a unified cache's slices
    hold them all (n_ctx: the context's); per sequence (unified=False, n_ctx: one stream's) every
    slice is there n_seq times; the frequent classes keep a store per sequence either way, and with the
    kv override fastgen.undo_tokens (a store in host memory) UNDO_BYTES per cell, head and token."""
    out = []
    for c, cls in enumerate(meta.classes):
        heads = sum(row[c] for row in meta.layer_class_heads)
        if cls.kind == Kind.FREQUENT:
            cells = class_capacity(meta, c, n_ctx, n_ubatch) * heads
            per_cell = head_dim * 2 * max(bytes_per_elem, 2) + 8 + undo_tokens * _C["UNDO_BYTES"]
            out.append(n_seq * (cells * per_cell + heads * HH_POS_PAD * 4))
        else:
            cells = class_capacity(meta, c, n_ctx, n_ubatch, n_seq if unified else 1) * heads
            out.append(cells * head_dim * 2 * bytes_per_elem * (1 if unified else n_seq))
    return out


def footprint_bytes(policies: list[list[HeadPolicy]], head_dim: int, n_ctx: int, protected_frac: float,
                    n_sink: int, bytes_per_elem: int = 2, budget_ctx: int = 0) -> tuple[float, float]:
    """(kept, full) K+V bytes for the tokens the policies keep at n_ctx (f16 by default): the
    policy's own footprint, before the native cache adds n_ubatch cells and pads to SLICE_PAD."""
    per_token = 2 * head_dim * bytes_per_elem
    full = sum(len(row) for row in policies) * n_ctx * per_token
    kept = sum(p.at_context(n_ctx, budget_ctx, n_sink).cost(n_ctx, protected_frac, n_sink)
               for row in policies for p in row) * per_token
    return kept, full
