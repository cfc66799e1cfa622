#!/usr/bin/env python3
"""Write a random-weight llama GGUF of a real shape, with fastgen metadata taken from a real profile.

Random weights are enough for speed, memory and CPU-vs-CUDA agreement (quality needs real
weights). The policy mix comes from a converter report (OUT.fastgen.json): its per-head policies
are mapped onto the target's layers (nearest layer) and KV heads (head h takes source head
h mod n_src), so the share of each class follows the profile. --frequent-as-full writes the same
mix with the heavy-hitter heads full: the baseline that isolates what those heads cost or save;
--full-as-frequent the same mix with every full head heavy-hitter (the profile's most common frequent policy), so no
layer mixes the two (the GPU runs' 'every head heavy-hitter' GGUF).

    python scripts/make_random_gguf.py --shape llama3-8b --profile REPORT.json --tree TREE --out M.gguf
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from llama_fastgen.schema import DEFAULT_N_SINK, FastgenMetadata, HeadPolicy, Kind, add_to_writer, class_order

SHAPES = {
    # n_layer, n_embd, n_head, n_head_kv, n_ff
    "llama3-8b": (32, 4096, 32, 8, 14336),
    "small": (8, 1024, 16, 4, 2816),      # head size 64
    "small-d128": (8, 1024, 8, 2, 2816),  # head size 128, as llama3-8b
}


def policy_from_report(report: dict, n_layer: int, n_kv: int, frequent_as_full: bool = False,
                       full_as_frequent: bool = False):
    """The report's per-head policies stretched over n_layer x n_kv heads: (classes in the
    converter's class order, per-layer head counts per class). frequent_as_full: every frequent head
    full; full_as_frequent: every full head takes the report's most common frequent policy."""
    src = report["policies"]                         # [L_src][H_src] labels, original head order
    L_src, H_src = len(src), len(src[0])
    common = None
    if full_as_frequent:
        freq = [lab for row in src for lab in row if HeadPolicy.from_label(lab).kind == Kind.FREQUENT]
        if not freq:
            raise SystemExit("make_random_gguf.py: --full-as-frequent needs a profile with a frequent head")
        common = HeadPolicy.from_label(max(set(freq), key=freq.count))
    heads = []
    for l in range(n_layer):
        ls = round(l * (L_src - 1) / max(n_layer - 1, 1))
        row = [HeadPolicy.from_label(src[ls][h % H_src]) for h in range(n_kv)]
        row = [HeadPolicy(Kind.FULL) if frequent_as_full and c.kind == Kind.FREQUENT else c for c in row]
        heads.append([common if full_as_frequent and c.kind == Kind.FULL else c for c in row])
    classes = sorted({c for row in heads for c in row}, key=class_order)
    counts = [[row.count(c) for c in classes] for row in heads]
    return classes, counts


def q4_0(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_0 blocks: an f16 scale so values have std ~ 1/sqrt(cols), then random nibbles."""
    nb = cols // 32
    data = rng.integers(0, 256, size=(rows, nb, 18), dtype=np.uint8)
    d = np.float16(1.0 / (4.6 * math.sqrt(cols)))
    data[:, :, 0:2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return data.reshape(rows, nb * 18)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--profile", type=Path, help="converter report JSON (none: no fastgen metadata)")
    ap.add_argument("--frequent-as-full", action="store_true",
                    help="same mix with every frequent head full (the speed baseline for heavy hitters)")
    ap.add_argument("--full-as-frequent", action="store_true",
                    help="same mix with every full head heavy-hitter (its most common frequent policy): no mixed layer")
    ap.add_argument("--tree", type=Path, required=True, help="pinned llama.cpp tree (gguf-py, vocab)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, str(a.tree / "gguf-py"))
    import gguf

    n_layer, n_embd, n_head, n_kv, n_ff = SHAPES[a.shape]
    hd = n_embd // n_head
    vocab = gguf.GGUFReader(str(a.tree / "models" / "ggml-vocab-llama-bpe.gguf"))
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(str(a.out), "llama")
    w.add_name(f"random {a.shape}")
    w.add_block_count(n_layer)
    w.add_context_length(131072)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, field.contents(), vtype)
    if a.profile:
        report = json.loads(a.profile.read_text())
        classes, counts = policy_from_report(report, n_layer, n_kv, a.frequent_as_full, a.full_as_frequent)
        meta = FastgenMetadata(threshold=float(report["threshold"]), n_sink=DEFAULT_N_SINK, classes=classes, layer_class_heads=counts,
                               head_perm=[list(range(n_kv))] * n_layer, special_token_ids=[], punct_token_ids=[],
                               protected_frac=float(report["protected_frac"]),
                               calibration={"random_weights": True, "profile": str(a.profile)})
        add_to_writer(w, meta.to_kv(), gguf)
    rng = np.random.default_rng(a.seed)
    Q = gguf.GGMLQuantizationType.Q4_0

    def add_q(name, rows, cols):
        w.add_tensor(name, q4_0(rows, cols, rng), raw_dtype=Q)  # byte shape: gguf-py derives (rows, cols)

    add_q("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    add_q("output.weight", n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_q(p + "attn_q.weight", n_embd, n_embd)
        add_q(p + "attn_k.weight", n_kv * hd, n_embd)
        add_q(p + "attn_v.weight", n_kv * hd, n_embd)
        add_q(p + "attn_output.weight", n_embd, n_embd)
        add_q(p + "ffn_gate.weight", n_ff, n_embd)
        add_q(p + "ffn_up.weight", n_ff, n_embd)
        add_q(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
