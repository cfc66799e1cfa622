// llama-fastgen: the retention rule of llama_kv_cache (declared by native/patches): cells that
// outlive the sliding window of a compressed class, i.e. attention sinks and protected token ids, and
// where its window's cells start (a tail removal checks that the window before the cut is whole).
#include "llama-kv-cache.h"

#include <algorithm>
#include <functional>
#include <vector>

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

llama_pos llama_kv_cache::fastgen_window_start(llama_seq_id s) const {
    // the slot search purges the oldest positions that are not retained; retained cells inside the window
    // (protected tokens) are held all the same, so walk down from the newest position while each is held
    const auto & cells = v_cells[seq_to_stream[s]];
    std::vector<llama_pos> pos;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, s)) {
            pos.push_back(cells.pos_get(i));
        }
    }
    std::sort(pos.begin(), pos.end(), std::greater<llama_pos>());
    llama_pos res = pos.empty() ? -1 : pos[0];
    for (size_t k = 1; k < pos.size() && pos[k] == res - 1; ++k) {
        res = pos[k];
    }
    return res;
}
