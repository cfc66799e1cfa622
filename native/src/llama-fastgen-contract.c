// llama-fastgen: the sizing rules of llama-fastgen-contract.h, in their own small library so that
// the converter's Python (plugin/schema.py) runs the very code libllama runs without loading libllama.
#include "llama-fastgen-contract.h"

#include <math.h>

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

uint32_t llama_fastgen_class_cells(int32_t kind, int32_t window, int32_t budget, uint32_t n_sink,
                                   float protected_frac, uint32_t n_ctx, uint32_t n_ubatch, uint32_t n_seq) {
    if (kind == LLAMA_FASTGEN_KIND_FULL) {
        return n_ctx;
    }
    if (kind == LLAMA_FASTGEN_KIND_FREQUENT) {
        // budget + room for one ubatch (or one eviction batch of decoded tokens)
        const uint32_t room = n_ubatch > LLAMA_FASTGEN_FREQUENT_EVICT_BATCH ? n_ubatch : LLAMA_FASTGEN_FREQUENT_EVICT_BATCH;
        return (uint32_t) min_u64(n_ctx, (uint64_t) budget + room);
    }
    // Retained protected tokens grow with the context: budget their observed share with a margin.
    // Special tokens alone are rare (chat control tokens): 2% of the context. n_seq sequences sharing
    // the cells (a unified cache) each keep their sinks and window, as llama.cpp's SWA cache sizes
    // n_swa*n_seq_max + n_ubatch; the protected share is of n_ctx, all sequences' tokens.
    double share = LLAMA_FASTGEN_SPECIAL_SHARE_PERMILLE/1000.0;
    if (kind != LLAMA_FASTGEN_KIND_SPECIAL) {
        share = LLAMA_FASTGEN_PROTECTED_MARGIN_PERMILLE/1000.0*protected_frac + LLAMA_FASTGEN_PROTECTED_EXTRA_PERMILLE/1000.0;
        share = share < 1.0 ? share : 1.0;
    }
    const uint64_t need = (uint64_t) n_seq*(n_sink + (uint64_t) window + LLAMA_FASTGEN_SLICE_SLACK) + n_ubatch +
                          (uint64_t) ceil(share*n_ctx);
    const uint64_t pad = LLAMA_FASTGEN_SLICE_PAD;
    return (uint32_t) min_u64(n_ctx, (min_u64(n_ctx, need) + pad - 1)/pad*pad); // CUDA FA wants K->ne[1] % 256 == 0
}

void llama_fastgen_class_at_context(int32_t kind, int32_t * window, int32_t * budget, uint32_t n_sink, uint32_t n_ctx,
                                    uint32_t budget_ctx) {
    if (budget_ctx == 0 || n_ctx <= budget_ctx) {
        return;
    }
#define SCALE(v) ((int32_t) min_u64(LLAMA_FASTGEN_MAX_CELLS, (uint64_t) (v)*n_ctx/budget_ctx))
    if (kind == LLAMA_FASTGEN_KIND_FREQUENT) {
        *budget = SCALE(*budget);
        // n_sink + window < budget holds after scaling unless the cap cut the budget
        const int32_t w = SCALE(*window), w_max = *budget - (int32_t) n_sink - 1;
        *window = w < w_max ? w : w_max;
    } else if (kind == LLAMA_FASTGEN_KIND_SPECIAL_PUNCT_LOCAL) {
        *window = SCALE(*window);
    }
#undef SCALE
}

int32_t llama_fastgen_class_problem(int32_t kind, int32_t window, int32_t budget, uint32_t n_sink) {
    if (kind < 0 || kind >= LLAMA_FASTGEN_N_KINDS) {
        return LLAMA_FASTGEN_CLASS_BAD_KIND;
    }
    const int full = kind == LLAMA_FASTGEN_KIND_FULL;
    if ((full && window != 0) || (!full && window < 1) || window > LLAMA_FASTGEN_MAX_CELLS) {
        return LLAMA_FASTGEN_CLASS_BAD_WINDOW;
    }
    if (kind == LLAMA_FASTGEN_KIND_FREQUENT) {
        return (int64_t) budget <= (int64_t) n_sink + window || budget > LLAMA_FASTGEN_MAX_CELLS ? LLAMA_FASTGEN_CLASS_BAD_BUDGET : 0;
    }
    return budget != 0 ? LLAMA_FASTGEN_CLASS_STRAY_BUDGET : 0;
}
