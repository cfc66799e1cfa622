// The contract the converter (Python) and the native cache share, defined once: the native code
// includes this file, plugin/schema.py reads it (installed next to it in the package) and calls the
// functions below from their own small library (libfastgen-contract, which libllama links),
// so the sizes a cache runs have one definition, with no torch or CUDA in the converter's process.
// Python parses the "#define LLAMA_FASTGEN_<NAME> <integer or "string">" lines and the
// LLAMA_FASTGEN_CONTRACT_API declarations.
#pragma once

#include <stdint.h>

#define LLAMA_FASTGEN_SCHEMA_VERSION 1
// GGUF keys: all start with the prefix
#define LLAMA_FASTGEN_KEY_PREFIX "fastgen."
#define LLAMA_FASTGEN_KEY_VERSION "fastgen.version"
#define LLAMA_FASTGEN_KEY_THRESHOLD "fastgen.threshold"
#define LLAMA_FASTGEN_KEY_N_SINK "fastgen.n_sink"
#define LLAMA_FASTGEN_KEY_CLASS_KIND "fastgen.class.kind"
#define LLAMA_FASTGEN_KEY_CLASS_WINDOW "fastgen.class.window"
#define LLAMA_FASTGEN_KEY_CLASS_BUDGET "fastgen.class.budget"
#define LLAMA_FASTGEN_KEY_LAYER_CLASS_HEADS "fastgen.layer_class_heads"
#define LLAMA_FASTGEN_KEY_HEAD_PERM "fastgen.head_perm"
#define LLAMA_FASTGEN_KEY_SPECIAL_TOKEN_IDS "fastgen.special_token_ids"
#define LLAMA_FASTGEN_KEY_PUNCT_TOKEN_IDS "fastgen.punct_token_ids"
#define LLAMA_FASTGEN_KEY_PROTECTED_FRAC "fastgen.protected_frac"
#define LLAMA_FASTGEN_KEY_CALIBRATION "fastgen.calibration"
#define LLAMA_FASTGEN_KEY_BUDGET_CTX "fastgen.budget_ctx"
// a kv override (not written by the converter): false runs the GGUF with the stock cache
#define LLAMA_FASTGEN_KEY_ENABLE "fastgen.enable"
// a kv override (an int, not written by the converter): how many of the newest tokens the heavy-hitter
// heads can drop again exactly (a rejected draft, an edited last chat turn), at UNDO_BYTES bytes per cell,
// head and token: each token's attention per cell is kept. 0 (the default): a removal that reaches the
// heavy-hitter heads needs a checkpoint (plugin/checkpoints.py). The CPU op records it on ubatches of at
// most undo_tokens tokens, the CUDA decode kernel on those of decode size; other devices keep 0
#define LLAMA_FASTGEN_KEY_UNDO_TOKENS "fastgen.undo_tokens"
#define LLAMA_FASTGEN_UNDO_BYTES 4
#define LLAMA_FASTGEN_MAX_UNDO_TOKENS 256
// values of fastgen.class.kind
#define LLAMA_FASTGEN_KIND_FULL 0
#define LLAMA_FASTGEN_KIND_SPECIAL 1
#define LLAMA_FASTGEN_KIND_SPECIAL_PUNCT 2
#define LLAMA_FASTGEN_KIND_SPECIAL_PUNCT_LOCAL 3
#define LLAMA_FASTGEN_KIND_FREQUENT 4
#define LLAMA_FASTGEN_N_KINDS 5
// each kind's label, as logs, `llama-fastgen inspect` and the converter's reports print it; special+punct+local
// adds its window ("special+punct+local128"), special+frequent its budget and "+local" + window
#define LLAMA_FASTGEN_LABEL_FULL "full"
#define LLAMA_FASTGEN_LABEL_SPECIAL "special"
#define LLAMA_FASTGEN_LABEL_SPECIAL_PUNCT "special+punct"
#define LLAMA_FASTGEN_LABEL_SPECIAL_PUNCT_LOCAL "special+punct+local"
#define LLAMA_FASTGEN_LABEL_FREQUENT "special+frequent"
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
// what llama_fastgen_class_problem finds wrong with a class (0: nothing)
#define LLAMA_FASTGEN_CLASS_BAD_KIND 1
#define LLAMA_FASTGEN_CLASS_BAD_WINDOW 2
#define LLAMA_FASTGEN_CLASS_BAD_BUDGET 3
#define LLAMA_FASTGEN_CLASS_STRAY_BUDGET 4

#if defined(_WIN32)
#    define LLAMA_FASTGEN_CONTRACT_API __declspec(dllexport)
#else
#    define LLAMA_FASTGEN_CONTRACT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// The cells a class of this kind, window and budget allocates in a cache of n_ctx cells (per
// stream) with ubatches of n_ubatch tokens, n_seq sequences sharing its cells (a unified cache;
// else 1): full n_ctx; frequent budget + max(n_ubatch, FREQUENT_EVICT_BATCH) per head of the
// heavy-hitter store (unpadded; the store gives every head the largest of its classes'); the others
// their slice, as the comments above say, padded to SLICE_PAD; never more than n_ctx.
LLAMA_FASTGEN_CONTRACT_API uint32_t llama_fastgen_class_cells(int32_t kind, int32_t window, int32_t budget, uint32_t n_sink,
                                                              float protected_frac, uint32_t n_ctx, uint32_t n_ubatch,
                                                              uint32_t n_seq);

// The window and budget the class runs in a cache of n_ctx cells when they were sized for budget_ctx
// (fastgen.budget_ctx; 0: fixed): above budget_ctx windows of special+punct+local classes and the
// windows and budgets of frequent classes grow by n_ctx / budget_ctx (at most MAX_CELLS; a frequent
// window stays below budget - n_sink), so a head keeps the same share of a longer context.
LLAMA_FASTGEN_CONTRACT_API void llama_fastgen_class_at_context(int32_t kind, int32_t * window, int32_t * budget,
                                                               uint32_t n_sink, uint32_t n_ctx, uint32_t budget_ctx);

// Whether a class can load (the loader's rule, and the converter's before it writes): 0, or BAD_KIND (not a
// kind above), BAD_WINDOW (full: 0; the others 1 to MAX_CELLS), BAD_BUDGET (frequent: above n_sink +
// window, which are never evicted, so heavy hitters have room; at most MAX_CELLS), STRAY_BUDGET (a budget on
// a class that is not frequent).
LLAMA_FASTGEN_CONTRACT_API int32_t llama_fastgen_class_problem(int32_t kind, int32_t window, int32_t budget, uint32_t n_sink);

#ifdef __cplusplus
}
#endif
