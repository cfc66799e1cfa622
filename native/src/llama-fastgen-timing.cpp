#include "llama-fastgen-timing.h"

#include "llama-fastgen-model.h"

#include <cstdio>

llama_fastgen_timing::llama_fastgen_timing() : on(llama_fastgen_env_flag_or_unset(LLAMA_FASTGEN_SWITCH_TIMING)) {}

llama_fastgen_timing::~llama_fastgen_timing() {
    if (!on) {
        return;
    }
    const auto each = [this](phase p) { return n[p] ? 1e3*ms[p]/n[p] : 0.0; };
    if (n[MASK_FILL] || n[MASK_UPDATE]) {
        fprintf(stderr, "fastgen timing: decode-step class masks: %llu filled over every cell (%.1f us each), "
                "%llu updated from the last step (%.1f us each)\n", (unsigned long long) n[MASK_FILL], each(MASK_FILL),
                (unsigned long long) n[MASK_UPDATE], each(MASK_UPDATE));
    }
    if (n_apply) {
        fprintf(stderr, "fastgen timing: %zu ubatches (%zu evicting): wait %.2f ms, read %.2f ms, evict %.2f ms, "
                "place+upload %.2f ms; then, in %llu that waited, host until inputs set %.2f ms\n", n_apply, n_evicting,
                ms[WAIT], ms[READ], ms[EVICT], ms[PLACE], (unsigned long long) n[AFTER_WAIT], ms[AFTER_WAIT]);
    }
}

llama_fastgen_timing & llama_fastgen_timing_record() {
    static llama_fastgen_timing record; // printed when the process exits
    return record;
}
