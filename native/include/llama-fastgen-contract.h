// The numbers the converter (Python) and the native cache must agree on, defined once: the native
// code includes this file and plugin/schema.py reads it (installed next to it in the package).
// Plain "#define NAME integer" lines only: that is all the Python side parses.
#pragma once

#define LLAMA_FASTGEN_SCHEMA_VERSION 1
// a frequent class evicts when it holds more than budget + this many cells: decoding pays for one
// score read-back and selection every FREQUENT_EVICT_BATCH tokens, not every token
#define LLAMA_FASTGEN_FREQUENT_EVICT_BATCH 32
// cells the slice of a compressed, non-frequent class allocates: per sequence n_sink + window +
// SLICE_SLACK, plus n_ubatch, plus a budget for retained protected tokens of share x n_ctx (share:
// SPECIAL_SHARE for special tokens only, else PROTECTED_MARGIN x protected_frac + PROTECTED_EXTRA,
// in thousandths), padded to SLICE_PAD cells (CUDA flash attention wants multiples of 256)
#define LLAMA_FASTGEN_SLICE_SLACK 32
#define LLAMA_FASTGEN_SPECIAL_SHARE_PERMILLE 20
#define LLAMA_FASTGEN_PROTECTED_MARGIN_PERMILLE 1500
#define LLAMA_FASTGEN_PROTECTED_EXTRA_PERMILLE 20
#define LLAMA_FASTGEN_SLICE_PAD 256
// floats after each heavy-hitter head's cell positions (the CUDA kernel's counters and its bound on
// the occupied cells; 32 bytes keep the rows aligned): part of the store's bytes
#define LLAMA_FASTGEN_HH_POS_PAD 8
// upper bounds a GGUF from a stranger must respect
#define LLAMA_FASTGEN_MAX_CLASSES 64
#define LLAMA_FASTGEN_MAX_N_SINK 65536
#define LLAMA_FASTGEN_MAX_CELLS 16777216
