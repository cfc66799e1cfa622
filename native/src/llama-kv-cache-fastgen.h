// llama-fastgen: a KV cache made of one ordinary llama_kv_cache "slice" per policy class.
//
// Every slice is built from a private hparams copy whose n_head_kv_arr[il] is the number of KV
// heads of that class in layer il (the trick DSA/MSA use), so its tensors hold only those heads
// and only as many cells as the class needs: full -> n_ctx, compressed -> sinks + window +
// protected budget + n_ubatch. Compressed slices evict lazily like llama.cpp's SWA cache
// (n_swa = window) and retain sinks and protected token ids (llama_kv_cache::set_retention).
// Sequence bookkeeping follows llama_kv_cache_iswa, generalised to N children: the slices and the
// heavy-hitter stores of the frequent classes (llama_fastgen_hh_memory: clear, whole-sequence
// removal, copy and keep, positions, fit, state; shifts and partial removals refused).
#pragma once

#include "llama-fastgen-policy.h"
#include "llama-kv-cache-fastgen-hh.h"
#include "llama-kv-cache.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

class llama_kv_cache_fastgen : public llama_memory_i {
public:
    llama_kv_cache_fastgen(
            const llama_model & model,
            std::shared_ptr<const llama_fastgen_policy> policy,
                    ggml_type   type_k,
                    ggml_type   type_v,
                         bool   v_trans,
                         bool   offload,
                         bool   unified,
                     uint32_t   kv_size,
                     uint32_t   n_seq_max,
                     uint32_t   n_ubatch);

    ~llama_kv_cache_fastgen() = default;

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // V stored transposed (no flash attention): else a class's V rows go where its K rows go, and one index
    // input serves both (one host-to-device copy less per class and ubatch)
    bool v_transposed() const { return v_trans; }
    // the graph's fastgen inputs of a ubatch as views of one graph input (llama-graph-fastgen.cpp, input_blob): where
    // the whole cache is in one device's memory, or LLAMA_FASTGEN_INPUT_COPY=1; decided at construction and logged
    bool one_input() const { return one_input_; }

    // per class: nullptr when no layer has a head of that class (or, for slice(), when it is frequent)
    size_t           n_class()   const { return slices.size(); }
    llama_kv_cache * slice(int c) const { return slices[c].get(); }
    // the heavy-hitter store of sequence s, shared by all frequent classes (nullptr without any)
    llama_fastgen_hh_store * hh_store(llama_seq_id s = 0) const { return hh.get(s); }
    const llama_fastgen_hh_memory & hh_memory() const { return hh; }
          llama_fastgen_hh_memory & hh_memory()       { return hh; }
    uint32_t         class_cells(int c) const;
    uint32_t         class_used(int c) const;
    llama_pos        class_dropped_upto(int c, llama_seq_id s) const; // protected tokens dropped below this
    size_t           slice_bytes(int c) const;
    // bytes an ordinary cache of the same types would allocate for n_ctx = kv_size
    size_t           full_bytes() const { return bytes_full; }

    const llama_fastgen_policy & get_policy() const { return *policy; }

    // Tail rollback: positions [p0, ...) of a sequence can be removed exactly when every compressed
    // class still holds what a cache that never saw them would use: a windowed class still holds the
    // window of a query at p0 (and dropped no protected token for them), the heavy-hitter stores can
    // take their attention back (llama_fastgen_hh_store::can_undo).
    bool can_remove_tail(llama_seq_id seq_id, llama_pos p0) const;
    // make a ubatch of n_tokens evaluated next removable again: the heavy-hitter stores run the
    // eviction it would run now (windowed classes purge only cells masked for its first token); false
    // when it still would not be (too many tokens, heads on a device, the composed path)
    bool make_removable(llama_seq_id seq_id, uint32_t n_tokens);
    // after a ubatch is applied: a batch that dropped protected tokens cannot be taken back
    void on_applied(const llama_ubatch & ubatch, bool last_of_batch);

    // Counts every change of the slices' cells (an applied ubatch, a memory operation): a decode step's
    // class mask can start from the last step's when exactly its own ubatch came between them
    // (llm_graph_input_attn_kv_fastgen::set_input)
    uint64_t cells_version() const { return version; }
    void     cells_changed() { ++version; }
    // class masks of decode steps filled over every cell / updated from the last step's, and (with
    // LLAMA_FASTGEN_CHECK_MASK=1, which fills updated masks in full too) updates that differed
    struct mask_counts {
        uint64_t filled = 0, updated = 0, mismatched = 0;
    };
    mutable mask_counts masks;

private:
    // identifies the policy table and the slices' sizes in a saved state
    uint64_t state_fingerprint() const;
    // newest position any compressed class (or heavy-hitter store) holds of the sequence (-1: none, seq_id < 0: any)
    llama_pos pos_max_compressed(llama_seq_id seq_id) const;
    // when retained tokens fill a compressed class: drop its oldest protected tokens (not sinks)
    bool evict_oldest_protected(int c);
    uint64_t version = 0;
    bool dropped_protected = false; // by the batch being applied
    std::map<llama_seq_id, llama_pos> drop_floor; // no tail removal below: protected tokens were dropped for a batch there

    bool one_input_ = false; // decided at the constructor's end, from LLAMA_FASTGEN_INPUT_COPY or where the cache lives
    std::shared_ptr<const llama_fastgen_policy> policy;

    std::vector<std::unique_ptr<llama_hparams>>  hparams_c; // referenced by the slices: stable addresses
    std::vector<std::unique_ptr<llama_kv_cache>> slices;
    llama_fastgen_hh_memory                      hh;        // all frequent classes: one store per sequence
    std::vector<std::string>                     tags;      // tensor name suffix per class
    std::vector<std::map<llama_seq_id, llama_pos>> evicted_upto; // per class: protected tokens dropped below this

    size_t   bytes_full = 0;
    bool     v_trans;
    bool     unified;
    uint32_t n_seq_max;
    uint32_t n_ubatch;
};

class llama_kv_cache_fastgen_context : public llama_memory_context_i {
public:
    using slot_info_vec_t = llama_kv_cache::slot_info_vec_t;

    explicit llama_kv_cache_fastgen_context(llama_memory_status status);
    explicit llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv);                                  // full
    llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv, llama_context * lctx, bool optimize);     // update
    llama_kv_cache_fastgen_context(llama_kv_cache_fastgen * kv, std::vector<slot_info_vec_t> sinfos,
                                   std::vector<llama_ubatch> ubatches);                                   // batch

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override;
    const llama_ubatch & get_ubatch() const override;

    // context of class c, nullptr when the class has no slice
    const llama_kv_cache_context * get(int c) const;
    const llama_kv_cache_fastgen * get_cache() const { return kv; }
    // cells of the heavy-hitter store a composed ubatch attends over: the occupied prefix after
    // apply() for a batch, every cell for the worst-case graph (reserve)
    uint32_t hh_n_active() const;
    // the heavy-hitter stores evict and place the current ubatch if apply() left it to the graph's set_input
    // (fused ubatches: llama_fastgen_hh_store::apply)
    void hh_place() const;

private:
    llama_kv_cache_fastgen * kv = nullptr;

    size_t i_next = 0;
    std::vector<llama_ubatch> ubatches;

    std::vector<llama_memory_context_ptr> ctxs; // one per class, nullptr where no slice

    const llama_memory_status status;
};
