#include "llama-kv-cache-fastgen.h"

#include "llama-batch.h"
#include "llama-fastgen-model.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <stdexcept>

//
// llama_kv_cache_fastgen
//

llama_kv_cache_fastgen::llama_kv_cache_fastgen(
        const llama_model & model,
        std::shared_ptr<const llama_fastgen_policy> policy_,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   v_trans,
                     bool   offload,
                     bool   unified,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_ubatch) : policy(policy_->for_context(kv_size)), v_trans(v_trans), unified(unified), n_seq_max(n_seq_max), n_ubatch(n_ubatch) {
    // 1, 0, or -1 when unset; read before the slices are allocated (the load has checked the word already)
    const int input_copy_env = llama_fastgen_env_tristate(LLAMA_FASTGEN_SWITCH_INPUT_COPY);
    const auto & hp = model.hparams;
    const int n_layer = (int) hp.n_layer();
    tags.reserve(policy->classes.size()); // c_str()s handed to the slices stay valid

    for (size_t c = 0; c < policy->classes.size(); ++c) {
        auto hc = std::make_unique<llama_hparams>(hp);
        bool any = false;
        for (int il = 0; il < n_layer; ++il) {
            hc->n_head_kv_arr[il] = (uint32_t) policy->n_heads(il, (int) c);
            any = any || hc->n_head_kv_arr[il] > 0;
        }
        const auto & cls = policy->classes[c];
        if (cls.kind == LLAMA_FASTGEN_FREQUENT) {
            if (any && hh.empty()) {
                hh.add(std::make_unique<llama_fastgen_hh_store>(model, *policy, type_k, type_v, offload, kv_size, n_ubatch));
            }
            if (any && (uint32_t) cls.budget >= kv_size) {
                LLAMA_LOG_WARN("%s: class %s: budget %d >= n_ctx %u, it never evicts (behaves as full)\n", __func__,
                        policy->describe_class((int) c).c_str(), cls.budget, kv_size);
            }
            any = false; // no ordinary slice
        }
        if (!any) {
            hparams_c.push_back(nullptr);
            slices.push_back(nullptr);
            continue;
        }
        const bool full  = cls.kind == LLAMA_FASTGEN_FULL;
        // unified: the sequences share the cells; else one stream per sequence of kv_size = n_ctx_seq cells each
        const uint32_t size = policy->capacity((int) c, kv_size, n_ubatch, unified ? n_seq_max : 1); // padded

        const llama_hparams * hcp = hc.get();
        llama_kv_cache::layer_filter_cb filter = [hcp](int32_t il) { return hcp->n_head_kv_arr[il] > 0; };

        auto kv = std::make_unique<llama_kv_cache>(
                model, *hc, type_k, type_v, v_trans, offload, unified, size, n_seq_max, 1,
                full ? 0 : (uint32_t) cls.window, full ? LLAMA_SWA_TYPE_NONE : LLAMA_SWA_TYPE_STANDARD,
                nullptr, filter, nullptr, nullptr, tags.emplace_back("_fg" + std::to_string(c)).c_str());
        if (!full) {
            kv->set_retention(policy->n_sink, policy->protected_tokens((int) c));
        }
        hparams_c.push_back(std::move(hc));
        slices.push_back(std::move(kv));
    }

    evicted_upto.assign(slices.size(), {});

    // what an ordinary cache would take: every head at n_ctx cells
    for (int il = 0; il < n_layer; ++il) {
        bytes_full += (size_t) kv_size * (ggml_row_size(type_k, hp.n_embd_k_gqa(il)) + ggml_row_size(type_v, hp.n_embd_v_gqa(il)));
    }
    bytes_full *= unified ? 1 : n_seq_max;

    // heavy-hitter cells are per head and sequence: a store per sequence (its ops take the ubatch's
    // tokens of that sequence, which an equal split keeps together)
    if (!hh.empty() && n_seq_max > 1) {
        const auto & st = *hh.get();
        std::string why = st.why_not_fused(1);
        why = why.empty() ? st.why_not_fused(n_ubatch) : why;
        if (!why.empty()) {
            throw std::runtime_error(format("fastgen: heavy-hitter heads serve several sequences (n_seq_max = %u) only "
                    "through the fused op, and %s: create the context with n_seq_max = 1, or disable fastgen "
                    "(kv_overrides " LLAMA_FASTGEN_KEY_ENABLE "=false)", n_seq_max, why.c_str()));
        }
        size_t other = 0;
        for (size_t c = 0; c < slices.size(); ++c) {
            other += slices[c] ? slice_bytes((int) c) : 0;
        }
        const size_t need = other + (size_t) n_seq_max*st.total_bytes();
        if (need > bytes_full) {
            throw std::runtime_error(format("fastgen: %u sequences with a heavy-hitter store each take %.1f MiB, more than "
                    "the full cache (%.1f MiB): use fewer sequences (n_seq_max), a GGUF without heavy-hitter heads, or "
                    "disable fastgen (kv_overrides " LLAMA_FASTGEN_KEY_ENABLE "=false)", n_seq_max, need/1048576.0, bytes_full/1048576.0));
        }
        while (hh.size() < n_seq_max) {
            hh.add(std::make_unique<llama_fastgen_hh_store>(model, *policy, type_k, type_v, offload, kv_size, n_ubatch));
        }
    }

    size_t total = 0;
    bool compressed = false; // some head is not full (an all-full policy saves nothing at any n_ctx)
    for (size_t c = 0; c < slices.size(); ++c) {
        if (!slices[c] && !class_cells((int) c)) {
            continue;
        }
        int heads = 0;
        for (int il = 0; il < n_layer; ++il) {
            heads += policy->n_heads(il, (int) c);
        }
        total += slice_bytes((int) c);
        compressed = compressed || (heads > 0 && policy->classes[c].kind != LLAMA_FASTGEN_FULL);
        LLAMA_LOG_INFO("%s: class %zu %-24s %3d heads, %6u cells, %8.2f MiB\n", __func__, c,
                policy->describe_class((int) c).c_str(), heads, class_cells((int) c), slice_bytes((int) c) / 1048576.0);
    }
    LLAMA_LOG_INFO("%s: KV cache %.2f MiB instead of %.2f MiB for the full cache (%.1f%%, %.2f MiB saved)\n", __func__,
            total / 1048576.0, bytes_full / 1048576.0, 100.0 * total / std::max<size_t>(bytes_full, 1),
            (double) (bytes_full - std::min(total, bytes_full)) / 1048576.0);
    if (total >= bytes_full && compressed) {
        LLAMA_LOG_WARN("%s: at n_ctx %u the classes' cells (windows and budgets, padded for a ubatch) reach the context: "
                "this policy saves no memory here, only at a larger n_ctx\n", __func__, kv_size);
    }
    // one copy to the device per ubatch instead of one per input (each with a stream sync) where the whole cache is in
    // one device's memory; elsewhere (host memory, layers split with the CPU or over several devices) the one copy
    // could land on another backend than most of its readers: more copies, not fewer. =1 forces it on any backend
    // (the CPU tests cover its views), =0 never.
    const auto mb = memory_breakdown();
    const bool on_device = mb.size() == 1 && !ggml_backend_buft_is_host(mb.begin()->first);
    one_input_ = input_copy_env < 0 ? on_device : input_copy_env == 1;
    if (one_input_) {
        LLAMA_LOG_INFO("%s: each ubatch's fastgen inputs (indices, masks) are one graph input%s\n", __func__,
                input_copy_env == 1 ? " (LLAMA_FASTGEN_INPUT_COPY=1)" : ", copied once to the device");
    }
    if (!hh.empty() && hh.get()->undo_tokens() > 0) {
        LLAMA_LOG_INFO("%s: heavy-hitter heads keep the attention of the newest %u tokens (%s), which can be removed "
                "again exactly; counted in their classes' MiB\n", __func__, hh.get()->undo_tokens(),
                LLAMA_FASTGEN_KEY_UNDO_TOKENS);
    }
}

uint32_t llama_kv_cache_fastgen::class_cells(int c) const {
    const bool freq = policy->classes[c].kind == LLAMA_FASTGEN_FREQUENT && hh.class_bytes(c) > 0;
    return slices[c] ? slices[c]->get_size() : freq ? hh.get()->get_size() : 0;
}

uint32_t llama_kv_cache_fastgen::class_used(int c) const {
    return slices[c] ? slices[c]->n_used_cells() : hh.max_used(c);
}

llama_pos llama_kv_cache_fastgen::class_dropped_upto(int c, llama_seq_id s) const {
    const auto it = evicted_upto[c].find(s);
    return it == evicted_upto[c].end() ? 0 : it->second;
}

size_t llama_kv_cache_fastgen::slice_bytes(int c) const {
    if (policy->classes[c].kind == LLAMA_FASTGEN_FREQUENT) { // no slice: the heavy-hitter stores
        return hh.class_bytes(c);
    }
    size_t n = 0;
    if (slices[c]) {
        for (const auto & [_, size] : slices[c]->memory_breakdown()) {
            n += size;
        }
    }
    return n;
}

void llama_kv_cache_fastgen::clear(bool data) {
    cells_changed();
    evicted_upto.assign(slices.size(), {});
    drop_floor.clear();
    hh.clear();
    for (auto & s : slices) {
        if (s) {
            s->clear(data);
        }
    }
}

bool llama_kv_cache_fastgen::can_remove_tail(llama_seq_id seq_id, llama_pos p0) const {
    if (!hh.can_undo(seq_id, p0)) {
        return false;
    }
    for (size_t c = 0; c < slices.size(); ++c) {
        if (!slices[c] || policy->classes[c].kind == LLAMA_FASTGEN_FULL) {
            continue;
        }
        for (llama_seq_id s = seq_id < 0 ? 0 : seq_id; s < (seq_id < 0 ? (llama_seq_id) n_seq_max : seq_id + 1); ++s) {
            // a query at p0 sees positions > p0 - window (those below n_sink are retained): all still there
            // (none to see when p0 is within the sinks, as in llama-server's probe: two tokens, the second removed)
            const llama_pos need = std::max<llama_pos>(p0 + 1 - policy->classes[c].window, (llama_pos) policy->n_sink);
            const llama_pos start = slices[c]->fastgen_window_start(s);
            if (slices[c]->seq_pos_max(s) >= p0 && need < p0 && start > need) {
                return false;
            }
        }
    }
    for (const auto & [s, floor] : drop_floor) {
        if ((seq_id < 0 || s == seq_id) && p0 < floor) {
            return false;
        }
    }
    return true;
}

bool llama_kv_cache_fastgen::make_removable(llama_seq_id seq_id, uint32_t n_tokens) {
    cells_changed();
    if (n_tokens > n_ubatch || !hh.records(seq_id, n_tokens)) {
        return false; // several ubatches, or not recorded: an eviction now would not be the one it runs
    }
    hh.evict_ahead(seq_id, n_tokens);
    return true;
}

void llama_kv_cache_fastgen::on_applied(const llama_ubatch & ub, bool last_of_batch) {
    for (uint32_t i = 0; dropped_protected && i < ub.n_tokens; ++i) {
        auto & floor = drop_floor[ub.seq_id[i][0]];
        floor = std::max(floor, ub.pos[i] + 1);
    }
    dropped_protected = dropped_protected && !last_of_batch;
}

bool llama_kv_cache_fastgen::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    // A compressed class has already evicted positions behind its window: removing positions it
    // still holds, unless the whole history goes, would leave new tokens without their window.
    // Refuse (llama-cpp-python then re-evaluates the prompt, or llama_fastgen.checkpoints restores
    // a state) when a compressed class holds a position >= p0. Full classes can always drop a suffix;
    // after a partial state restore (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) only they hold the tail.
    if (p0 < 0) {
        p0 = 0;
    }
    llama_pos pmax = -1; // seq_id < 0: every sequence
    for (llama_seq_id s = seq_id < 0 ? 0 : seq_id; s < (seq_id < 0 ? (llama_seq_id) n_seq_max : seq_id + 1); ++s) {
        pmax = std::max(pmax, seq_pos_max(s));
    }
    if (p0 <= pmax && (p1 < 0 || p1 > p0)) {
        cells_changed(); // (llama-cpp-python removes what follows its tokens before every evaluation: mostly nothing)
    }
    const llama_pos pmax_compressed = pos_max_compressed(seq_id);
    const bool everything = p0 == 0 && (p1 < 0 || p1 > pmax);
    if (!everything && p0 <= pmax_compressed) {
        // the newest positions only, and only while every class can take them back exactly
        if ((p1 >= 0 && p1 <= pmax) || !can_remove_tail(seq_id, p0)) {
            LLAMA_LOG_DEBUG("%s: refusing to remove positions [%d, %d) of a compressed cache\n", __func__, p0, p1);
            return false;
        }
        hh.undo(seq_id, p0);
    }
    if (everything) {
        for (auto & m : evicted_upto) {
            seq_id < 0 ? m.clear() : (void) m.erase(seq_id);
        }
        hh.seq_rm(seq_id);
        seq_id < 0 ? drop_floor.clear() : (void) drop_floor.erase(seq_id);
    }
    bool res = true;
    for (auto & s : slices) {
        if (s) {
            res = s->seq_rm(seq_id, p0, p1) && res;
        }
    }
    return res;
}

void llama_kv_cache_fastgen::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    cells_changed();
    if (seq_id_src == seq_id_dst) {
        return;
    }
    if (!hh.seq_cp(seq_id_src, seq_id_dst, p0, p1)) {
        return;
    }
    for (auto & s : slices) {
        if (s) {
            s->seq_cp(seq_id_src, seq_id_dst, p0, p1);
        }
    }
    if (drop_floor.count(seq_id_src)) {
        drop_floor[seq_id_dst] = drop_floor[seq_id_src];
    }
    for (auto & m : evicted_upto) { // the copy has dropped what the source has
        const auto it = m.find(seq_id_src);
        if (it != m.end() && p0 <= 0) {
            m[seq_id_dst] = it->second;
        }
    }
}

void llama_kv_cache_fastgen::seq_keep(llama_seq_id seq_id) {
    cells_changed();
    hh.seq_keep(seq_id);
    for (auto it = drop_floor.begin(); it != drop_floor.end();) {
        it = it->first == seq_id ? std::next(it) : drop_floor.erase(it);
    }
    for (auto & m : evicted_upto) {
        for (auto it = m.begin(); it != m.end();) {
            it = it->first == seq_id ? std::next(it) : m.erase(it);
        }
    }
    for (auto & s : slices) {
        if (s) {
            s->seq_keep(seq_id);
        }
    }
}

void llama_kv_cache_fastgen::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    cells_changed();
    if (!get_can_shift() && shift != 0) {
        llama_fastgen_refuse(__func__, "fastgen: positions of a compressed cache cannot be shifted (its windows and heavy hitters "
                "were chosen at their positions); positions unchanged. Leave context shifting off");
        return;
    }
    for (auto & s : slices) {
        if (s) {
            s->seq_add(seq_id, p0, p1, shift);
        }
    }
}

void llama_kv_cache_fastgen::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    cells_changed();
    if (!get_can_shift() && d != 1) {
        llama_fastgen_refuse(__func__, "fastgen: positions of a compressed cache cannot be divided; positions unchanged");
        return;
    }
    for (auto & s : slices) {
        if (s) {
            s->seq_div(seq_id, p0, p1, d);
        }
    }
}

llama_pos llama_kv_cache_fastgen::pos_max_compressed(llama_seq_id seq_id) const {
    llama_pos res = hh.seq_pos_max(seq_id);
    for (llama_seq_id s = seq_id < 0 ? 0 : seq_id; s < (seq_id < 0 ? (llama_seq_id) n_seq_max : seq_id + 1); ++s) {
        for (size_t c = 0; c < slices.size(); ++c) {
            if (slices[c] && policy->classes[c].kind != LLAMA_FASTGEN_FULL) {
                res = std::max(res, slices[c]->seq_pos_max(s));
            }
        }
    }
    return res;
}

llama_pos llama_kv_cache_fastgen::seq_pos_min(llama_seq_id seq_id) const {
    // What llama-server reads as the oldest position held: with pos_min below the next position it cuts
    // there (seq_rm), else it restores a context checkpoint (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) or
    // evaluates the prompt again. So one below the lowest position a tail removal may cut at
    // (can_remove_tail holds from some position on: windows whole, the heavy hitters' undo floor), and
    // the newest position where no cut is possible, as llama.cpp's recurrent memory answers; never a
    // cut inside evicted history. Full classes alone: their own.
    const llama_pos pc = pos_max_compressed(seq_id);
    if (pc >= 0) {
        if (!can_remove_tail(seq_id, pc)) {
            return pc;
        }
        llama_pos lo = 0, hi = pc; // the lowest p0 it accepts lies in [lo, hi]
        while (lo < hi) {
            const llama_pos mid = lo + (hi - lo)/2;
            if (can_remove_tail(seq_id, mid)) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        return std::max<llama_pos>(lo - 1, 0);
    }
    llama_pos res = -1;
    for (const auto & s : slices) {
        if (s) {
            const llama_pos p = s->seq_pos_min(seq_id);
            res = res < 0 ? p : p < 0 ? res : std::min(res, p);
        }
    }
    return res;
}

llama_pos llama_kv_cache_fastgen::seq_pos_max(llama_seq_id seq_id) const {
    llama_pos res = hh.seq_pos_max(seq_id);
    for (const auto & s : slices) {
        if (s) {
            res = std::max(res, s->seq_pos_max(seq_id));
        }
    }
    return res;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_fastgen::memory_breakdown() const {
    auto mb = hh.memory_breakdown();
    for (const auto & s : slices) {
        if (s) {
            for (const auto & [buft, size] : s->memory_breakdown()) {
                mb[buft] += size;
            }
        }
    }
    return mb;
}

llama_memory_context_ptr llama_kv_cache_fastgen::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    // as llama_kv_cache_iswa: try a simple split, then an equal split; every slice must fit. Several
    // sequences with heavy-hitter stores: equal splits only (each sequence's tokens together, for its store)
    const bool per_seq_hh = hh.size() > 1;
    for (int attempt = 0; attempt < 2; ++attempt) {
        if (attempt == 0 && (!unified || per_seq_hh)) {
            continue; // requires equal splits
        }
        balloc.split_reset();
        std::vector<llama_ubatch> ubatches;
        while (true) {
            auto ubatch = attempt == 0 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, !unified, 0);
            if (ubatch.n_tokens == 0) {
                break;
            }
            ubatches.push_back(std::move(ubatch)); // NOLINT
        }
        if (balloc.get_n_used() < balloc.get_n_tokens()) {
            continue;
        }
        if (!hh.takes_seqs(ubatches)) {
            return std::make_unique<llama_kv_cache_fastgen_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        std::vector<llama_kv_cache::slot_info_vec_t> sinfos(slices.size());
        bool ok = hh.fits(ubatches);
        for (size_t c = 0; c < slices.size() && ok; ++c) {
            if (!slices[c]) {
                continue;
            }
            sinfos[c] = slices[c]->prepare(ubatches);
            // protected budget full: drop the oldest protected tokens (a quarter of them at a time)
            for (int i = 0; i < 8 && sinfos[c].empty() && evict_oldest_protected((int) c); ++i) {
                sinfos[c] = slices[c]->prepare(ubatches);
            }
            if (sinfos[c].empty()) {
                if (attempt == 1 && policy->classes[c].kind != LLAMA_FASTGEN_FULL) {
                    llama_fastgen_refuse(__func__, format("fastgen class %s (%u cells) has no room for this batch even "
                            "after dropping protected tokens; use a larger n_ctx or a smaller n_ubatch",
                            policy->describe_class((int) c).c_str(), slices[c]->get_size()));
                }
                ok = false;
            }
        }
        if (ok) {
            return std::make_unique<llama_kv_cache_fastgen_context>(this, std::move(sinfos), std::move(ubatches));
        }
    }
    return std::make_unique<llama_kv_cache_fastgen_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
}

bool llama_kv_cache_fastgen::evict_oldest_protected(int c) {
    cells_changed();
    const auto & cls = policy->classes[c];
    if (cls.kind == LLAMA_FASTGEN_FULL) {
        return false;
    }
    bool evicted = false;
    for (llama_seq_id s = 0; s < (llama_seq_id) n_seq_max; ++s) {
        const llama_pos pmax = slices[c]->seq_pos_max(s);
        if (pmax < 0) {
            continue;
        }
        // below the window only retained cells remain; sinks stay; evicted_upto skips what is gone
        auto & upto = evicted_upto[c][s];
        const llama_pos lo = std::max<llama_pos>(upto, (llama_pos) policy->n_sink);
        const llama_pos hi = pmax + 1 - cls.window;
        if (hi <= lo) {
            continue;
        }
        const llama_pos cut = lo + std::max<llama_pos>(1, (hi - lo)/4);
        LLAMA_LOG_WARN("%s: class %s is full: dropping protected tokens at positions [%d, %d) of sequence %d\n",
                __func__, policy->describe_class(c).c_str(), lo, cut, s);
        slices[c]->seq_rm(s, lo, cut);
        upto    = cut;
        evicted = true;
        dropped_protected = true;
    }
    return evicted;
}

llama_memory_context_ptr llama_kv_cache_fastgen::init_full() {
    return std::make_unique<llama_kv_cache_fastgen_context>(this);
}

llama_memory_context_ptr llama_kv_cache_fastgen::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<llama_kv_cache_fastgen_context>(this, lctx, optimize);
}

bool llama_kv_cache_fastgen::get_can_shift() const {
    // a K-shift would move retained and windowed cells of different slices inconsistently
    return !policy->has_compressed();
}

// A saved state starts with what it was made for: restoring it into a cache of another policy or
// size would read cells into the wrong heads, so both are checked before anything is read.
static constexpr uint32_t STATE_MAGIC         = 0x32534746; // "FGS2" (2: the heavy-hitter stores are counted)
static constexpr uint32_t STATE_MAGIC_PARTIAL = 0x32504746; // "FGP2": the compressed classes only (checkpoints)

// the slices a state holds: all, or in a partial state the compressed ones (full heads drop a suffix natively)
static bool slice_in_state(const llama_fastgen_policy & policy, size_t c, bool partial) {
    return !(partial && policy.classes[c].kind == LLAMA_FASTGEN_FULL);
}

uint64_t llama_kv_cache_fastgen::state_fingerprint() const {
    uint64_t h = 1469598103934665603ull; // FNV-1a over the policy table and the cache's sizes
    auto mix = [&h](int64_t v) { for (int i = 0; i < 8; ++i) { h = (h ^ (uint8_t) (v >> (8*i))) * 1099511628211ull; } };
    for (const auto & c : policy->classes) {
        mix(c.kind); mix(c.window); mix(c.budget);
    }
    for (const auto & row : policy->layer_class_heads) {
        for (int32_t n : row) {
            mix(n);
        }
    }
    mix(policy->n_sink);
    for (size_t c = 0; c < slices.size(); ++c) {
        mix(slices[c] ? (int64_t) slices[c]->get_size() : -1);
    }
    mix(hh.empty() ? -1 : (int64_t) hh.get()->get_size());
    mix(hh.empty() ? -1 : (int64_t) hh.get()->total_bytes()); // the K/V types too: the store reads raw tensor bytes
    return h;
}

void llama_kv_cache_fastgen::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    const bool     partial = flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY;
    const uint32_t magic   = partial ? STATE_MAGIC_PARTIAL : STATE_MAGIC;
    const uint64_t fp      = state_fingerprint();
    io.write(&magic, sizeof(magic));
    io.write(&fp, sizeof(fp));
    // where each class has dropped protected tokens (the next drop continues from there)
    for (const auto & m : evicted_upto) {
        uint32_t n = 0;
        for (const auto & [s, _] : m) {
            n += seq_id < 0 || s == seq_id;
        }
        io.write(&n, sizeof(n));
        for (const auto & [s, pos] : m) {
            if (seq_id < 0 || s == seq_id) {
                io.write(&s, sizeof(s));
                io.write(&pos, sizeof(pos));
            }
        }
    }
    hh.state_write(io, seq_id);
    for (size_t c = 0; c < slices.size(); ++c) {
        if (slices[c] && slice_in_state(*policy, c, partial)) {
            slices[c]->state_write(io, seq_id, flags & ~LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
        }
    }
}

void llama_kv_cache_fastgen::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    cells_changed();
    try {
        uint32_t magic = 0;
        uint64_t fp    = 0;
        io.read(&magic, sizeof(magic));
        io.read(&fp, sizeof(fp));
        const bool partial = flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY;
        if (magic == (partial ? STATE_MAGIC : STATE_MAGIC_PARTIAL)) {
            throw std::runtime_error(partial ? "fastgen: a whole saved state cannot be restored as a partial one"
                                             : "fastgen: a partial saved state (compressed classes only) cannot be restored as a whole one");
        }
        if (magic != (partial ? STATE_MAGIC_PARTIAL : STATE_MAGIC)) {
            throw std::runtime_error("fastgen: the saved state is not a fastgen cache's (saved with fastgen off, "
                    "or by another version): restore it into a context like the one that saved it");
        }
        if (fp != state_fingerprint()) {
            throw std::runtime_error("fastgen: the saved state belongs to another policy table or context size: "
                    "restore it into a context created from the same GGUF with the same n_ctx and n_ubatch");
        }
        std::vector<std::map<llama_seq_id, llama_pos>> upto(slices.size());
        for (auto & m : upto) {
            uint32_t n = 0;
            io.read(&n, sizeof(n));
            // one sequence's state may come from another slot id (llama.cpp restores it into seq_id)
            if (n > (seq_id < 0 ? n_seq_max : 1)) {
                throw std::runtime_error(format("fastgen: corrupt saved state (%u sequences, at most %u)", n, n_seq_max));
            }
            for (uint32_t i = 0; i < n; ++i) {
                llama_seq_id s = 0;
                llama_pos pos  = 0;
                io.read(&s, sizeof(s));
                io.read(&pos, sizeof(pos));
                if ((seq_id < 0 && (s < 0 || (uint32_t) s >= n_seq_max)) || pos < 0) {
                    throw std::runtime_error(format("fastgen: corrupt saved state (sequence %d, position %d)", s, pos));
                }
                m[seq_id < 0 ? s : seq_id] = pos;
            }
        }
        hh.state_read(io, seq_id);
        for (size_t c = 0; c < slices.size(); ++c) {
            if (slices[c] && slice_in_state(*policy, c, partial)) {
                slices[c]->state_read(io, seq_id, flags & ~LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
            }
        }
        for (size_t c = 0; c < upto.size(); ++c) { // the saved drops replace the current ones
            if (seq_id < 0) {
                evicted_upto[c] = std::move(upto[c]);
            } else {
                evicted_upto[c].erase(seq_id);
                evicted_upto[c].insert(upto[c].begin(), upto[c].end());
            }
        }
        // where the saved history dropped protected tokens is not saved: no tail removal inside it then
        seq_id < 0 ? drop_floor.clear() : (void) drop_floor.erase(seq_id);
        for (const auto & m : evicted_upto) {
            for (const auto & [s, _] : m) {
                if (seq_id < 0 || s == seq_id) {
                    drop_floor[s] = seq_pos_max(s) + 1;
                }
            }
        }
    } catch (const std::exception & e) {
        llama_fastgen_set_last_error(e.what()); // llama.cpp only logs it; Python adds it to its error
        // nothing half-restored: what was being restored is empty, the rest of the cache untouched
        seq_id < 0 ? clear(true) : (void) seq_rm(seq_id, -1, -1);
        throw;
    }
}

//
// llama_kv_cache_fastgen_context
//

llama_kv_cache_fastgen_context::llama_kv_cache_fastgen_context(llama_memory_status status) : status(status) {}

// `none`: the status when no class has an ordinary slice (every class frequent)
static llama_memory_status combine(const std::vector<llama_memory_context_ptr> & ctxs,
                                   llama_memory_status none = LLAMA_MEMORY_STATUS_SUCCESS) {
    llama_memory_status st = LLAMA_MEMORY_STATUS_NO_UPDATE;
    bool any = false;
    for (const auto & c : ctxs) {
        if (c) {
            st  = llama_memory_status_combine(st, c->get_status());
            any = true;
        }
    }
    return any ? st : none;
}

static std::vector<llama_memory_context_ptr> make_ctxs(llama_kv_cache_fastgen * kv,
        const std::function<llama_memory_context_ptr(llama_kv_cache *, size_t)> & make) {
    std::vector<llama_memory_context_ptr> res(kv->n_class());
    for (size_t c = 0; c < kv->n_class(); ++c) {
        if (kv->slice((int) c)) {
            res[c] = make(kv->slice((int) c), c);
        }
    }
    return res;
}

llama_kv_cache_fastgen_context::llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv) :
    kv(kv),
    ctxs(make_ctxs(kv, [](llama_kv_cache * s, size_t) { return s->init_full(); })),
    status(combine(ctxs)) {
}

llama_kv_cache_fastgen_context::llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv, llama_context * lctx, bool optimize) :
    kv(kv),
    ctxs(make_ctxs(kv, [&](llama_kv_cache * s, size_t) { return s->init_update(lctx, optimize); })),
    status(combine(ctxs, LLAMA_MEMORY_STATUS_NO_UPDATE)) {
}

llama_kv_cache_fastgen_context::llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv,
        std::vector<slot_info_vec_t> sinfos, std::vector<llama_ubatch> ubatches_) :
    kv(kv),
    ubatches(std::move(ubatches_)),
    ctxs(make_ctxs(kv, [&](llama_kv_cache * s, size_t c) -> llama_memory_context_ptr {
        return std::make_unique<llama_kv_cache_context>(s, std::move(sinfos[c]), this->ubatches);
    })),
    status(combine(ctxs)) {
}

bool llama_kv_cache_fastgen_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    for (auto & c : ctxs) {
        if (c) {
            c->next();
        }
    }
    return ++i_next < ubatches.size();
}

bool llama_kv_cache_fastgen_context::apply() {
    assert(!llama_memory_status_is_fail(status));
    kv->cells_changed();
    // a batch: the heavy-hitter stores evict and place this ubatch
    bool res = ubatches.empty() || kv->hh_memory().apply(ubatches[i_next]);
    for (auto & c : ctxs) {
        if (c) {
            res = c->apply() && res;
        }
    }
    if (!ubatches.empty()) {
        kv->on_applied(ubatches[i_next], i_next + 1 == ubatches.size());
    }
    return res;
}

uint32_t llama_kv_cache_fastgen_context::hh_n_active() const {
    const auto * h = kv->hh_store();
    return !h ? 0 : ubatches.empty() ? h->get_size() : h->get_n_active(); // composed ubatches: one sequence
}

void llama_kv_cache_fastgen_context::hh_place() const {
    if (!ubatches.empty()) {
        kv->hh_memory().place(ubatches[i_next]);
    }
}

llama_memory_status llama_kv_cache_fastgen_context::get_status() const {
    return status;
}

const llama_ubatch & llama_kv_cache_fastgen_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

const llama_kv_cache_context * llama_kv_cache_fastgen_context::get(int c) const {
    return static_cast<const llama_kv_cache_context *>(ctxs[c].get());
}
