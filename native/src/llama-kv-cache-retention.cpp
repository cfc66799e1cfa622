// llama-fastgen: the retention rule of llama_kv_cache (declared by native/patches): cells that
// outlive the sliding window of a compressed class, i.e. attention sinks and protected token ids.
#include "llama-kv-cache.h"

void llama_kv_cache::set_retention(uint32_t n_sink, std::vector<bool> protected_tok) {
    fastgen_n_sink    = n_sink;
    fastgen_protected = std::move(protected_tok);
}

bool llama_kv_cache::is_retained(const llama_kv_cells & cells, uint32_t idx) const {
    if ((uint32_t) cells.pos_get(idx) < fastgen_n_sink) {
        return true;
    }
    const llama_token tok = cells.ext_get(idx).tok;
    return tok >= 0 && (size_t) tok < fastgen_protected.size() && fastgen_protected[tok];
}

uint32_t llama_kv_cache::n_used_cells() const {
    uint32_t n = 0;
    for (const auto & cells : v_cells) {
        n += cells.get_used();
    }
    return n;
}
