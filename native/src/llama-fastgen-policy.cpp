#include "llama-fastgen-policy.h"

#include "gguf.h"
#include "llama-impl.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

// the contract header's label of a known kind (indexed by kind), and all of them for messages
static const char * kind_label(int kind) {
    static const char * const labels[] = {
        LLAMA_FASTGEN_LABEL_FULL, LLAMA_FASTGEN_LABEL_SPECIAL, LLAMA_FASTGEN_LABEL_SPECIAL_PUNCT,
        LLAMA_FASTGEN_LABEL_SPECIAL_PUNCT_LOCAL, LLAMA_FASTGEN_LABEL_FREQUENT };
    static_assert(sizeof labels / sizeof labels[0] == LLAMA_FASTGEN_N_KINDS, "a label for every kind, in kind order");
    return labels[kind];
}

static std::string kind_labels() {
    std::string s;
    for (int k = 0; k < LLAMA_FASTGEN_N_KINDS; ++k) {
        s += format("%s%d %s", k ? ", " : "", k, kind_label(k));
    }
    return s;
}

static std::vector<int32_t> get_i32_arr(const gguf_context * ctx, const char * key, bool required) {
    const int64_t kid = gguf_find_key(ctx, key);
    if (kid < 0) {
        if (required) {
            throw std::runtime_error(format("fastgen: missing key %s; re-run convert.py --profile", key));
        }
        return {};
    }
    if (gguf_get_kv_type(ctx, kid) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, kid) != GGUF_TYPE_INT32) {
        throw std::runtime_error(format("fastgen: key %s must be an int32 array", key));
    }
    const size_t n = gguf_get_arr_n(ctx, kid);
    const auto * data = (const int32_t *) gguf_get_arr_data(ctx, kid);
    return std::vector<int32_t>(data, data + n);
}

static int64_t get_scalar_key(const gguf_context * ctx, const char * key, gguf_type type) {
    const int64_t kid = gguf_find_key(ctx, key);
    if (kid < 0) {
        throw std::runtime_error(format("fastgen: missing key %s; re-run convert.py --profile", key));
    }
    if (gguf_get_kv_type(ctx, kid) != type) {
        throw std::runtime_error(format("fastgen: key %s has type %s, expected %s", key,
                gguf_type_name(gguf_get_kv_type(ctx, kid)), gguf_type_name(type)));
    }
    return kid;
}

std::shared_ptr<llama_fastgen_policy> llama_fastgen_policy::load(
        const gguf_context * ctx, const llama_hparams & hparams, uint32_t n_vocab) {
    if (gguf_find_key(ctx, LLAMA_FASTGEN_KEY_VERSION) < 0) {
        // no policy, unless other fastgen keys say one was meant: then refuse rather than run full
        for (int64_t i = 0; i < gguf_get_n_kv(ctx); ++i) {
            if (strncmp(gguf_get_key(ctx, i), LLAMA_FASTGEN_KEY_PREFIX, strlen(LLAMA_FASTGEN_KEY_PREFIX)) == 0) {
                throw std::runtime_error(format("fastgen: %s is set but " LLAMA_FASTGEN_KEY_VERSION " is missing; "
                        "re-run convert.py --profile", gguf_get_key(ctx, i)));
            }
        }
        return nullptr;
    }
    auto p = std::make_shared<llama_fastgen_policy>();

    const uint32_t version = gguf_get_val_u32(ctx, get_scalar_key(ctx, LLAMA_FASTGEN_KEY_VERSION, GGUF_TYPE_UINT32));
    if (version != SCHEMA_VERSION) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_VERSION " is %u but this build reads version %u; "
                "re-run convert.py --profile with this llama-fastgen", version, SCHEMA_VERSION));
    }
    p->threshold      = gguf_get_val_f32(ctx, get_scalar_key(ctx, LLAMA_FASTGEN_KEY_THRESHOLD, GGUF_TYPE_FLOAT32));
    p->n_sink         = gguf_get_val_u32(ctx, get_scalar_key(ctx, LLAMA_FASTGEN_KEY_N_SINK, GGUF_TYPE_UINT32));
    p->protected_frac = gguf_get_val_f32(ctx, get_scalar_key(ctx, LLAMA_FASTGEN_KEY_PROTECTED_FRAC, GGUF_TYPE_FLOAT32));
    if (const int64_t kid = gguf_find_key(ctx, LLAMA_FASTGEN_KEY_BUDGET_CTX); kid >= 0) { // optional: budgets fixed without it
        p->budget_ctx = gguf_get_val_u32(ctx, get_scalar_key(ctx, LLAMA_FASTGEN_KEY_BUDGET_CTX, GGUF_TYPE_UINT32));
        if (p->budget_ctx < 1 || p->budget_ctx > (uint32_t) MAX_CELLS) {
            throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_BUDGET_CTX " = %u must be in [1, %d]; re-run convert.py --profile",
                    p->budget_ctx, MAX_CELLS));
        }
    }
    if (p->n_sink > MAX_N_SINK) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_N_SINK " = %u exceeds %u", p->n_sink, MAX_N_SINK));
    }
    if (!(p->protected_frac >= 0.0f && p->protected_frac <= 1.0f)) {
        throw std::runtime_error("fastgen: " LLAMA_FASTGEN_KEY_PROTECTED_FRAC " must be in [0, 1]");
    }

    const auto kinds   = get_i32_arr(ctx, LLAMA_FASTGEN_KEY_CLASS_KIND, true);
    const auto windows = get_i32_arr(ctx, LLAMA_FASTGEN_KEY_CLASS_WINDOW, true);
    if (kinds.size() > MAX_CLASSES) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_KIND " has %zu classes, at most %u are allowed",
                kinds.size(), MAX_CLASSES));
    }
    if (kinds.empty() || kinds.size() != windows.size()) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_KIND " (%zu) and " LLAMA_FASTGEN_KEY_CLASS_WINDOW " (%zu) must "
                "have the same, non-zero length", kinds.size(), windows.size()));
    }
    auto budgets = get_i32_arr(ctx, LLAMA_FASTGEN_KEY_CLASS_BUDGET, false); // only needed with frequent classes
    if (budgets.empty()) {
        budgets.assign(kinds.size(), 0);
    }
    if (budgets.size() != kinds.size()) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_BUDGET " has %zu entries, " LLAMA_FASTGEN_KEY_CLASS_KIND " %zu",
                budgets.size(), kinds.size()));
    }
    for (size_t c = 0; c < kinds.size(); ++c) {
        switch (llama_fastgen_class_problem(kinds[c], windows[c], budgets[c], p->n_sink)) {
            case LLAMA_FASTGEN_CLASS_BAD_KIND:
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_KIND "[%zu] = %d is not a known class id "
                        "(0 to %d: %s)", c, kinds[c], LLAMA_FASTGEN_N_KINDS - 1, kind_labels().c_str()));
            case LLAMA_FASTGEN_CLASS_BAD_WINDOW:
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_WINDOW "[%zu] = %d is invalid for class kind %d",
                        c, windows[c], kinds[c]));
            case LLAMA_FASTGEN_CLASS_BAD_BUDGET:
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_BUDGET "[%zu] = %d must exceed n_sink + window = %d "
                        "and be at most %d for a frequent class; re-run convert.py --profile", c, budgets[c],
                        (int) p->n_sink + windows[c], MAX_CELLS));
            case LLAMA_FASTGEN_CLASS_STRAY_BUDGET:
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_CLASS_BUDGET "[%zu] = %d is set for class kind %d, "
                        "only frequent classes have a budget", c, budgets[c], kinds[c]));
            default:
                break;
        }
        p->classes.push_back({ (llama_fastgen_kind) kinds[c], windows[c], budgets[c] });
    }

    const size_t n_class = p->classes.size();
    const auto lch = get_i32_arr(ctx, LLAMA_FASTGEN_KEY_LAYER_CLASS_HEADS, true);
    if (lch.size() != hparams.n_layer() * n_class) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_LAYER_CLASS_HEADS " has %zu entries, expected "
                "n_layer * n_class = %u * %zu", lch.size(), hparams.n_layer(), n_class));
    }
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        std::vector<int32_t> row(lch.begin() + il*n_class, lch.begin() + (il + 1)*n_class);
        int64_t sum = 0; // each count is at most n_head_kv, so the sum cannot wrap
        for (size_t c = 0; c < row.size(); ++c) {
            if (row[c] < 0 || (uint32_t) row[c] > hparams.n_head_kv(il)) {
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_LAYER_CLASS_HEADS " gives layer %u class %zu %d KV heads, "
                        "the model has %u", il, c, row[c], hparams.n_head_kv(il)));
            }
            sum += row[c];
        }
        if (sum != (int64_t) hparams.n_head_kv(il)) {
            throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_LAYER_CLASS_HEADS " gives layer %u %lld KV heads, the "
                    "model has %u: the metadata does not belong to this model", il, (long long) sum, hparams.n_head_kv(il)));
        }
        p->layer_class_heads.push_back(std::move(row));
    }

    // the converter's head order per layer: not used at run time, but a GGUF whose table is not a
    // permutation was not written by it (the Python reader refuses the same)
    const auto perm = get_i32_arr(ctx, LLAMA_FASTGEN_KEY_HEAD_PERM, true);
    size_t at = 0;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        const uint32_t n = hparams.n_head_kv(il);
        std::vector<bool> seen(n, false);
        for (uint32_t h = 0; h < n; ++h, ++at) {
            const int32_t v = at < perm.size() ? perm[at] : -1;
            if (at >= perm.size()) {
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_HEAD_PERM " has %zu entries, fewer than the model's KV "
                        "heads; re-run convert.py --profile", perm.size()));
            }
            if (v < 0 || (uint32_t) v >= n || seen[v]) {
                throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_HEAD_PERM " of layer %u is not a permutation of its %u KV "
                        "heads (entry %u is %d); re-run convert.py --profile", il, n, h, v));
            }
            seen[v] = true;
        }
    }
    if (at != perm.size()) {
        throw std::runtime_error(format("fastgen: " LLAMA_FASTGEN_KEY_HEAD_PERM " has %zu entries, the model %zu KV heads", perm.size(), at));
    }
    if (const int64_t kid = gguf_find_key(ctx, LLAMA_FASTGEN_KEY_CALIBRATION); kid >= 0 && gguf_get_kv_type(ctx, kid) != GGUF_TYPE_STRING) {
        throw std::runtime_error(format("fastgen: key " LLAMA_FASTGEN_KEY_CALIBRATION " has type %s, expected %s",
                gguf_type_name(gguf_get_kv_type(ctx, kid)), gguf_type_name(GGUF_TYPE_STRING)));
    }

    p->special_tok.assign(n_vocab, false);
    p->punct_tok.assign(n_vocab, false);
    for (const char * key : { LLAMA_FASTGEN_KEY_SPECIAL_TOKEN_IDS, LLAMA_FASTGEN_KEY_PUNCT_TOKEN_IDS }) {
        auto & dst = key[8] == 's' ? p->special_tok : p->punct_tok;
        for (int32_t id : get_i32_arr(ctx, key, false)) {
            if (id < 0 || (uint32_t) id >= n_vocab) {
                throw std::runtime_error(format("fastgen: %s holds token id %d outside the vocabulary (%u)", key, id, n_vocab));
            }
            dst[id] = true;
        }
    }
    return p;
}

bool llama_fastgen_policy::has_frequent() const {
    for (const auto & c : classes) {
        if (c.kind == LLAMA_FASTGEN_FREQUENT) {
            return true;
        }
    }
    return false;
}

bool llama_fastgen_policy::has_compressed() const {
    for (const auto & c : classes) {
        if (c.kind != LLAMA_FASTGEN_FULL) {
            return true;
        }
    }
    return false;
}

int32_t llama_fastgen_policy::head_offset(int il, int c) const {
    int32_t off = 0;
    for (int i = 0; i < c; ++i) {
        off += layer_class_heads[il][i];
    }
    return off;
}

uint32_t llama_fastgen_policy::capacity(int c, uint32_t n_ctx, uint32_t n_ubatch, uint32_t n_seq) const {
    const auto & cls = classes[c];
    return llama_fastgen_class_cells(cls.kind, cls.window, cls.budget, n_sink, protected_frac, n_ctx, n_ubatch, n_seq);
}

std::shared_ptr<const llama_fastgen_policy> llama_fastgen_policy::for_context(uint32_t n_ctx) const {
    auto p = std::make_shared<llama_fastgen_policy>(*this);
    if (budget_ctx == 0 || n_ctx <= budget_ctx) {
        return p;
    }
    for (auto & cls : p->classes) {
        llama_fastgen_class_at_context(cls.kind, &cls.window, &cls.budget, n_sink, n_ctx, budget_ctx);
    }
    return p;
}

std::vector<bool> llama_fastgen_policy::protected_tokens(int c) const {
    std::vector<bool> res = special_tok;
    // frequent classes protect special tokens only: punctuation competes by score within the budget
    if (classes[c].kind == LLAMA_FASTGEN_SPECIAL_PUNCT || classes[c].kind == LLAMA_FASTGEN_SPECIAL_PUNCT_LOCAL) {
        for (size_t i = 0; i < res.size(); ++i) {
            res[i] = res[i] || punct_tok[i];
        }
    }
    return res;
}

std::string llama_fastgen_policy::describe_class(int c) const {
    const auto & cls = classes[c];
    if (cls.kind == LLAMA_FASTGEN_FREQUENT) {
        return format(LLAMA_FASTGEN_LABEL_FREQUENT "%d+local%d", cls.budget, cls.window);
    }
    return cls.kind == LLAMA_FASTGEN_SPECIAL_PUNCT_LOCAL ? format("%s%d", kind_label(cls.kind), cls.window)
                                                         : std::string(kind_label(cls.kind));
}
