// llama-fastgen: the heavy-hitter store of the `frequent` classes (FastGen's C_frequent, H2O).
//
// All frequent classes share one store (they are consecutive in class order, so a layer's frequent
// heads are one contiguous range): one attention call per layer instead of one per class, at the
// price of every head getting the largest class's capacity. Each head keeps its own class's
// budget and window.
//
// The kept tokens differ per (layer, head), so cells are per head, not shared like in
// llama_kv_cache: per layer K [D, cap, n_h], V transposed [cap, D, n_h] (so attention needs no
// copy), F32 scores [cap, n_h] and F32 cell positions [cap, n_h] (pos - 0.5, +inf when free: the
// mask lives on the device, so a decoding step uploads only the new tokens' slots; each head's row
// ends in 32 bytes of padding, where the fused op's CUDA kernel counts its finished blocks). The graph
// (llama-graph-fastgen.cpp) writes new tokens into the slots chosen here, attends with an explicit
// softmax (flash attention hides the probabilities) and adds each cell's attention, summed over
// the ubatch's queries and the head's query group, to its score. Short ubatches (decoding) run as
// one fused op (native/ggml/ggml-fastgen.h), which also writes the new cells' positions, and so do
// long ones where the store's backend runs it (CPU, CUDA); after a composed ubatch, an eviction, clear or state load, the host re-uploads the positions. Eviction runs on the host before a ubatch, batched: a head holding more than
// budget + FREQUENT_EVICT_BATCH cells (counting the new ones) drops back to `budget` cells by
// removing the lowest mean score (score / queries that saw the cell); sinks and the window are
// never evicted, special tokens only when nothing else is left. One sequence: llama_fastgen_hh_memory
// keeps a store per sequence.
#pragma once

#include "llama-fastgen-policy.h"
#include "llama-batch.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <vector>

struct llama_model;
class llama_io_write_i;
class llama_io_read_i;

class llama_fastgen_hh_store {
public:
    // throws if the frequent classes are not consecutive in class order
    llama_fastgen_hh_store(const llama_model & model, const llama_fastgen_policy & policy,
                           ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch);

    struct layer {
        int32_t       il;
        int32_t       n_head;
        std::vector<int32_t>  cls;    // [head] class index
        std::vector<uint32_t> budget; // [head]
        std::vector<uint32_t> window; // [head]
        ggml_tensor * k; // [D, cap, n_head]
        ggml_tensor * v; // [cap, D, n_head]
        ggml_tensor * s; // [cap, n_head] F32, a view of its block's
        ggml_tensor * p; // [cap + GGML_FASTGEN_HH_P_PAD, n_head] F32 cell positions - 0.5, +inf when free; a view
        ggml_tensor * u; // [cap, n_head, n_undo] F32 each recent token's addition to the scores (slot pos % n_undo); a view, or nullptr
        int32_t       blk;   // its block (buffer type) in `blocks`
        int64_t       h_blk; // its first head's row in the block's s and p
        std::vector<std::vector<llama_pos>>   pos; // [head][cell], -1 when free
        std::vector<std::vector<llama_token>> tok; // [head][cell]
        std::vector<uint32_t>                 n_used;
        std::vector<uint32_t>                 hint;  // [head] no free cell below this one
        bool                                  dirty = true; // device positions differ from pos
        // the current ubatch: slot of each token per head, and 1 for cells that held a token before it
        std::vector<int64_t> slots; // [n_head][n_tokens]
        std::vector<float>   keep;  // [n_head][cap], composed ubatches only
    };

    // layer index in `layers` of model layer il, -1 when the class has no head there
    int32_t       layer_of(int32_t il) const { return il < (int32_t) index.size() ? index[il] : -1; }
    const layer & get_layer(int32_t li) const { return layers[li]; }
    // heads of the class over all layers, and the first of layer li among them (graph inputs are
    // one tensor per class with the layers' heads side by side: few host-to-device copies)
    int32_t       n_head_total() const { return n_heads_all; }
    int32_t       head_offset(int32_t li) const { return offsets[li]; }

    uint32_t get_size()   const { return cap; }
    // cells a composed ubatch attends over: the occupied prefix of every head, padded (cap for fused ones)
    uint32_t get_n_active() const { return n_active; }
    // does a ubatch of n_tokens run as the fused op (else the composed ggml path); one answer for
    // the store and the graph. LLAMA_FASTGEN_HH_FUSED=0 forces the composed path, to compare.
    bool     fused(uint32_t n_tokens) const;
    std::string why_not_fused(uint32_t n_tokens) const; // for a refusal that needs the op (empty: fused)
    int32_t  first_class() const { return c_first; } // the class whose slot in the graph runs the store
    uint32_t max_used(int c) const;    // most cells any (layer, head) of class c holds
    size_t   class_bytes(int c) const; // K + V + score bytes of class c's heads
    size_t   total_bytes() const;
    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const;

    // evict if needed, then choose the slots of the ubatch's tokens and commit them (false: no room);
    // sched: synchronized before reading or writing tensors the last graph may still be using.
    // A fused ubatch's graph depends on neither, so apply() (the first step of llama.cpp's ubatch) only
    // checks that it fits, and place() does both from the graph input's set_input: after llama.cpp built and
    // allocated the graph, work the host then does while the device still computes the previous ubatch,
    // whose scores the eviction waits for. A composed ubatch's graph attends over n_active cells: apply()
    // does both.
    bool apply(const llama_ubatch & ubatch, ggml_backend_sched_t sched);
    void place(const llama_ubatch & ubatch, ggml_backend_sched_t sched); // after apply(); once per ubatch
    // would a batch fit, n_new[u] of its tokens in ubatch u (cells are freed by eviction, never by the batch itself)
    bool fits(const std::vector<uint32_t> & n_new) const;

    // Tail rollback (fastgen.undo_tokens): with n_undo > 0 the fused op keeps each of the newest n_undo
    // tokens' additions to the scores, so removing them again takes their attention out of the scores
    // and frees their cells: the store is then the one a cache that never saw them holds (up to float
    // rounding). Not when an eviction ran for a ubatch at or after the cut (it would not have run, or
    // differently), nor into a ubatch that was not recorded (composed, or on CUDA prefill-sized).
    uint32_t undo_tokens() const { return n_undo; }
    bool records(uint32_t n_tokens) const; // does the op keep a ubatch of n_tokens' contributions
    bool can_undo(llama_pos p0) const;     // can positions [p0, ...) be removed exactly
    void undo(llama_pos p0, ggml_backend_sched_t sched); // remove them (after can_undo)
    // run now the eviction a ubatch of n_tokens would run before it (same scores, same trigger): a cache
    // that then evaluates fewer tokens evicts at the same step (speculative decoding and its oracle)
    void evict_ahead(uint32_t n_tokens, ggml_backend_sched_t sched);

    // graph inputs for the current ubatch, all layers: slots I64 [n_tokens, n_head_total] and query
    // positions F32 [n_tokens]; composed ubatches also keep F32 [n_active, n_head_total] and cell
    // positions F32 [n_active, n_head_total] (pos - 0.5, +inf when free), which the graph turns into the mask
    void set_input_idxs(ggml_tensor * dst, uint32_t t0 = 0) const; // this store's tokens from t0 of the ubatch
    void set_input_keep(ggml_tensor * dst) const;
    void set_input_cell_pos(ggml_tensor * dst) const;
    static void set_input_query_pos(ggml_tensor * dst, const llama_ubatch & ubatch);

    void clear();
    // become a copy of another store of the same cache (a whole sequence copied); sched: synchronized first
    void copy_from(const llama_fastgen_hh_store & src, ggml_backend_sched_t sched);
    llama_pos pos_max() const { return last_pos; }

    void state_write(llama_io_write_i & io) const;
    void state_read (llama_io_read_i  & io);

private:
    // evict head h of l back to its budget from its scores (scratch: the candidates, a thread's own;
    // nan: set when a score was NaN, such cells go first); returns the cells evicted. Touches only that
    // head's state, so heads evict in parallel.
    size_t evict(layer & l, int h, const float * scores, llama_pos p0, std::vector<struct llama_fastgen_hh_cand> & scratch,
                 bool & nan) const;
    // evict, choose the slots and commit (apply()'s or place()'s); false: no room
    bool commit(const llama_ubatch & ub, ggml_backend_sched_t sched);
    // will the ubatch's tokens fit after the eviction it triggers (the cells that eviction can free)
    bool room_for(const llama_ubatch & ub) const;
    // the eviction part of commit(): heads that would overflow with n more tokens drop back to their
    // budget (scores read back once); returns whether a cell was evicted
    bool evict_for(uint32_t n, llama_pos p0, ggml_backend_sched_t sched, bool & synced, std::chrono::steady_clock::time_point & t);
    void upload_positions(); // the dirty layers', one copy per block
    bool op_supported(ggml_backend_dev_t dev, const layer & l, int64_t n_group, int64_t n_tokens) const;

    uint32_t cap = 0;
    uint32_t n_undo = 0;     // tokens whose score contributions are kept
    bool     undo_host = true; // every layer in host memory (the CPU op keeps them for any ubatch)
    llama_pos undo_floor = 0; // no removal below this position can be undone
    uint32_t n_active = 0; // set by apply()
    uint32_t  pending_n  = 0;  // the fused ubatch apply() left to place(): its tokens and first position
    llama_pos pending_p0 = -1;
    int32_t  c_first = -1;
    uint32_t n_sink;
    size_t   bytes_per_head = 0;
    std::vector<bool> special; // by token id: evicted only when nothing else is left

    // per buffer type: the scores and positions of all its layers' heads, and host copies for the
    // read-back and the upload
    struct block {
        ggml_backend_buffer_type_t buft;
        ggml_tensor *      s;
        ggml_tensor *      p;
        ggml_tensor *      u = nullptr; // [cap, heads, n_undo]
        int64_t            n_placed = 0; // rows given to layers so far
        std::vector<float> s_host;
        std::vector<float> p_host;
        std::vector<float> u_host;
    };
    std::vector<block>   blocks;
    std::vector<layer>   layers;
    std::vector<int32_t> index;
    std::vector<int32_t> offsets;
    int32_t              n_heads_all = 0;
    llama_pos            last_pos = -1;
    bool                 warned_nan = false;
    std::string          fused_off; // why the fused op cannot take these shapes and types (empty: it can)
    bool                 dev_decode  = true; // the devices holding the store run the fused op on decode-sized
    bool                 dev_prefill = true; // and on prefill-sized ubatches (host memory: the CPU op, any)
    uint32_t             n_group = 1;      // query heads per KV head

    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;
};

// The heavy-hitter stores of a cache, one per sequence (none without frequent heads), with the
// operations the composite runs on each of its children (no stores: no-ops). Not a full llama_memory_i:
// position shifts (seq_add/seq_div) and partial removals are refused by the composite for these heads.
class llama_fastgen_hh_memory {
public:
    void   add(std::unique_ptr<llama_fastgen_hh_store> st) { stores.push_back(std::move(st)); }
    bool   empty() const { return stores.empty(); }
    size_t size()  const { return stores.size(); }
    // the store of sequence s (nullptr without stores)
    llama_fastgen_hh_store * get(llama_seq_id s = 0) const { return stores.empty() ? nullptr : stores[s].get(); }

    // The scheduler that computes the graphs using the stores' tensors, recorded by the graph build
    // (first at the worst-case reserve in llama_context's constructor, before any graph runs; const:
    // the graph sees the cache as const). Graphs run asynchronously on the backends' own streams
    // (CUDA: not the stream ggml_backend_tensor_get/set/copy use), so the host synchronizes it before
    // reading scores, re-uploading positions or copying a store. This holds while llama_context
    // builds a graph with this memory after every scheduler it creates (sched_reserve does), before
    // any ubatch is applied.
    void set_sched(ggml_backend_sched_t s) const { sched = s; }

    // one sequence per token, below the number of stores (else logs why)
    bool takes_seqs(const std::vector<llama_ubatch> & ubatches) const;
    // would the ubatches fit, each store taking its sequence's tokens (after takes_seqs)
    bool fits(const std::vector<llama_ubatch> & ubatches) const;
    // each sequence's tokens of the ubatch to its store (false: no room); place() from the graph's set_input
    bool apply(const llama_ubatch & ubatch);
    void place(const llama_ubatch & ubatch);

    void      clear();
    void      seq_rm(llama_seq_id seq_id); // the whole sequence (every one when < 0): cells are per sequence
    bool      seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1); // whole sequences only (else false, unchanged)
    void      seq_keep(llama_seq_id seq_id);
    llama_pos seq_pos_max(llama_seq_id seq_id) const; // -1: none; seq_id < 0: any sequence
    bool      can_undo(llama_seq_id seq_id, llama_pos p0) const; // the stores' tail rollback (seq_id < 0: every store)
    void      undo(llama_seq_id seq_id, llama_pos p0);
    bool      records(llama_seq_id seq_id, uint32_t n_tokens) const; // every store keeps such a ubatch's scores
    void      evict_ahead(llama_seq_id seq_id, uint32_t n_tokens);

    uint32_t max_used(int c) const;    // most cells any (layer, head) of class c holds in any store
    size_t   class_bytes(int c) const; // class c's bytes over all stores
    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id) const;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id);

private:
    std::vector<llama_fastgen_hh_store *> stores_of(llama_seq_id seq_id) const; // seq_id < 0: all
    template <typename F> bool every(llama_seq_id seq_id, F && f) const { // f holds for each of those stores
        const auto sts = stores_of(seq_id);
        return std::all_of(sts.begin(), sts.end(), f);
    }

    std::vector<std::unique_ptr<llama_fastgen_hh_store>> stores;
    mutable ggml_backend_sched_t sched = nullptr;
};

// A ubatch as the heavy-hitter stores see it: with several sequences (an equal split) a group of
// n_tokens / n_seqs consecutive tokens per sequence, else one group; each group goes to its sequence's store.
uint32_t     hh_n_groups(const llama_ubatch & ub);
llama_seq_id hh_group_seq(const llama_ubatch & ub, uint32_t g);
llama_ubatch hh_group(const llama_ubatch & ub, uint32_t g); // token and pos offset, n_tokens of the group
