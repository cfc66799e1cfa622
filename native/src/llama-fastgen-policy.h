// llama-fastgen: the per-KV-head policy table read from a GGUF's fastgen.* keys (schema v1,
// documented in plugin/schema.py). Heads are already permuted so each layer's classes are
// contiguous in class order.
#pragma once

#include "llama-hparams.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama-fastgen-contract.h"

struct gguf_context;

enum llama_fastgen_kind : int32_t {
    LLAMA_FASTGEN_FULL                = LLAMA_FASTGEN_KIND_FULL,
    LLAMA_FASTGEN_SPECIAL             = LLAMA_FASTGEN_KIND_SPECIAL,
    LLAMA_FASTGEN_SPECIAL_PUNCT       = LLAMA_FASTGEN_KIND_SPECIAL_PUNCT,
    LLAMA_FASTGEN_SPECIAL_PUNCT_LOCAL = LLAMA_FASTGEN_KIND_SPECIAL_PUNCT_LOCAL,
    // heavy hitters: a fixed budget of cells per (layer, head) holding sinks, special tokens, the
    // recent window and the tokens with the highest mean attention received (llama-kv-cache-fastgen-hh)
    LLAMA_FASTGEN_FREQUENT            = LLAMA_FASTGEN_KIND_FREQUENT,
};

struct llama_fastgen_class {
    llama_fastgen_kind kind;
    int32_t            window; // positions kept behind the query (1 = the query itself); 0 for full
    int32_t            budget; // frequent: cells kept per head between evictions; 0 otherwise
};

struct llama_fastgen_policy {
    // the numbers Python shares (llama-fastgen-contract.h, read by plugin/schema.py)
    static constexpr uint32_t SCHEMA_VERSION       = LLAMA_FASTGEN_SCHEMA_VERSION;
    static constexpr uint32_t FREQUENT_EVICT_BATCH = LLAMA_FASTGEN_FREQUENT_EVICT_BATCH;
    static constexpr uint32_t MAX_CLASSES          = LLAMA_FASTGEN_MAX_CLASSES;
    static constexpr uint32_t MAX_N_SINK           = LLAMA_FASTGEN_MAX_N_SINK;
    static constexpr int32_t  MAX_CELLS            = LLAMA_FASTGEN_MAX_CELLS; // window or budget of one class

    float    threshold      = 0.0f;
    uint32_t n_sink         = 0;
    float    protected_frac = 0.0f;
    // the n_ctx the windows and budgets were sized for (fastgen.budget_ctx); 0: they are fixed
    uint32_t budget_ctx     = 0;

    std::vector<llama_fastgen_class>  classes;
    std::vector<std::vector<int32_t>> layer_class_heads; // [n_layer][n_class]
    std::vector<bool>                 special_tok;       // by token id
    std::vector<bool>                 punct_tok;         // by token id (special ∪ punct for class kinds >= 2)

    // false: contexts get the ordinary full cache (kv override fastgen.enable=false, or LLAMA_FASTGEN_DISABLE=1)
    bool enabled = true;
    // the newest tokens the heavy-hitter heads can drop exactly (kv override fastgen.undo_tokens)
    uint32_t undo_tokens = 0;

    bool has_compressed() const;
    bool has_frequent() const;

    // heads of class c in layer il and the index of its first head
    int32_t n_heads(int il, int c) const { return layer_class_heads[il][c]; }
    int32_t head_offset(int il, int c) const;

    // cells class c allocates at context n_ctx with ubatches of n_ubatch tokens, n_seq sequences
    // sharing them (llama_fastgen_class_cells of the contract, which Python calls too)
    uint32_t capacity(int c, uint32_t n_ctx, uint32_t n_ubatch, uint32_t n_seq = 1) const;

    // protected token ids of class c (by id)
    std::vector<bool> protected_tokens(int c) const;

    std::string describe_class(int c) const;

    // the policy a cache of n_ctx cells runs: windows and frequent budgets of compressed classes
    // grow by n_ctx / budget_ctx when n_ctx > budget_ctx (the stored values are the floors), so the
    // share of the context a head keeps does not shrink as the context grows (FastGen's r)
    std::shared_ptr<const llama_fastgen_policy> for_context(uint32_t n_ctx) const;

    // nullptr when the GGUF has no fastgen keys; throws std::runtime_error naming the key otherwise
    static std::shared_ptr<llama_fastgen_policy> load(const gguf_context * ctx, const llama_hparams & hparams,
                                                      uint32_t n_vocab);
};
