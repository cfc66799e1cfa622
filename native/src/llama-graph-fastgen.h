// llama-fastgen: graph side of the per-class cache. Indices + mask per class (inputs, or views of one); per
// layer, attention runs once per class on its contiguous head range and the outputs are
// concatenated before the output projection (heads are in class order thanks to the converter).
#pragma once

#include "llama-graph.h"

#include <vector>

class llama_kv_cache_fastgen_context;

class llm_graph_input_attn_kv_fastgen : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_kv_fastgen(const llama_hparams & hparams, const llama_cparams & cparams,
                                    const llama_kv_cache_fastgen_context * mctx);

    void set_input(const llama_ubatch * ubatch) override;
    void set_input_mask(int c, const llama_ubatch * ubatch); // class c's kq_mask
    bool can_reuse(const llm_graph_params & params) override;

    struct per_class {
        ggml_tensor * k_idxs  = nullptr;
        ggml_tensor * v_idxs  = nullptr; // k_idxs itself where V is not transposed
        ggml_tensor * kq_mask = nullptr; // [n_kv_c, n_tokens/n_stream, 1, n_stream]
        // a full class: its last decode step's mask, for the next step (set_input)
        struct mask_memo {
            bool              valid   = false;
            uint64_t          version = 0; // llama_kv_cache_fastgen::cells_version() after that step
            llama_seq_id      seq     = -1;
            llama_pos         pos     = -1;
            std::vector<char> row;
        } memo;
    };
    std::vector<per_class> cls;

    // frequent classes (one shared store): the heads of all layers side by side
    struct per_hh {
        ggml_tensor * idxs      = nullptr; // I64 [n_tokens, H]: cell of each new token per head
        // composed (long) ubatches only; the fused op reads positions from the store
        ggml_tensor * keep      = nullptr; // F32 [cap, H]: 0 resets the score of a free or reused cell
        ggml_tensor * cell_pos  = nullptr; // F32 [cap, 1, 1, H]
        ggml_tensor * query_pos = nullptr; // F32 [1, n_tokens]
        ggml_tensor * mask      = nullptr; // F32 [cap, n_tokens, 1, H], computed in the graph (composed path only)
        std::vector<llama_seq_id> seqs;    // the sequence of each token group (hh_group): its store's tensors are in the graph
    };
    per_hh hh; // members stay nullptr without frequent classes

    // the cache's one_input(): the one graph input every tensor above is a view of (through its copy;
    // llama-graph-fastgen.cpp, input_blob); nullptr where each is an input of its own
    ggml_tensor * blob = nullptr;
    // t over host memory, for set_input to write: t itself, or (a view of the blob's copy) the blob's bytes
    ggml_tensor host(const ggml_tensor * t) const;

    const llama_kv_cache_fastgen_context * mctx_fg;
};

// hooks called from llm_graph_context (native/patches): nullptr when mctx is not a fastgen cache
llm_graph_input_attn_kv * llama_fastgen_build_attn_inp(const llm_graph_context & g);

ggml_tensor * llama_fastgen_build_attn(
        const llm_graph_context & g,
        llm_graph_input_attn_kv_fastgen * inp,
        ggml_tensor * wo,
        ggml_tensor * wo_b,
        ggml_tensor * wo_s,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        float         kq_scale,
        int           il);
