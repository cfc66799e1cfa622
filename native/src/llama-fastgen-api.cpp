// Exported llama_fastgen_* C functions: version and build facts.
#include "llama-fastgen.h"

#include "ggml-backend.h"
#include "llama-fastgen-model.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>
#include <string>

#ifndef LLAMA_FASTGEN_VERSION
#error "LLAMA_FASTGEN_VERSION must be defined by the build"
#endif
#ifndef LLAMA_FASTGEN_LLAMA_COMMIT
#error "LLAMA_FASTGEN_LLAMA_COMMIT must be defined by the build"
#endif

const char * llama_fastgen_version(void) {
    return LLAMA_FASTGEN_VERSION;
}

const char * llama_fastgen_llama_commit(void) {
    return LLAMA_FASTGEN_LLAMA_COMMIT;
}

const char * llama_fastgen_backends(void) {
    // Ask ggml's registry rather than trusting compile flags: it lists what really loaded.
    static std::string names;
    names.clear();
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        if (!names.empty()) {
            names += ",";
        }
        names += ggml_backend_reg_name(ggml_backend_reg_get(i));
    }
    return names.c_str();
}

// RPC: llama.cpp's own backend, reached through ggml's registry as its tools do (no link to ggml-rpc)
static ggml_backend_reg_t rpc_reg() {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (!reg) {
        llama_fastgen_set_last_error("this llama-fastgen build has no RPC backend (build it with -DGGML_RPC=ON)");
    }
    return reg;
}

bool llama_fastgen_rpc_add_server(const char * endpoint) {
    ggml_backend_reg_t reg = rpc_reg();
    if (!reg) {
        return false;
    }
    auto add = (ggml_backend_reg_t (*)(const char *)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server");
    ggml_backend_reg_t server = add ? add(endpoint) : nullptr;
    if (!server) {
        llama_fastgen_set_last_error(std::string("no RPC server answers at ") + endpoint +
                                     " (start one with: llama-fastgen rpc-server --port PORT)");
        return false;
    }
    ggml_backend_register(server);
    return true;
}

bool llama_fastgen_rpc_serve(const char * endpoint, int32_t n_threads) {
    ggml_backend_reg_t reg = rpc_reg();
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) {
        llama_fastgen_set_last_error("no CPU backend to serve");
    }
    if (!reg || !cpu) {
        return false;
    }
    auto serve = (void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *))
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_start_server");
    if (!serve) {
        llama_fastgen_set_last_error("the RPC backend has no start_server function");
        return false;
    }
    serve(endpoint, nullptr, (size_t) std::max(1, n_threads), 1, &cpu);
    llama_fastgen_set_last_error(std::string("the RPC server at ") + endpoint + " stopped (port in use?)");
    return false;
}

//
// policy and cache statistics
//

#include "llama-context.h"
#include "llama-fastgen-policy.h"
#include "llama-kv-cache-fastgen.h"

const char * llama_fastgen_last_error(void) {
    return llama_fastgen_last_error_str().c_str();
}

// llama.cpp's first error line since the last clear, kept by a log callback in front of the previous one
static std::mutex        g_llama_error_mutex;
static std::string       g_llama_error, g_llama_error_out;
static bool              g_llama_error_open = false; // CONT lines continue the kept error
static ggml_log_callback g_next_log      = nullptr;
static void *            g_next_log_data = nullptr;

static void keep_llama_errors(ggml_log_level level, const char * text, void * /*user_data*/) {
    {
        std::lock_guard<std::mutex> lock(g_llama_error_mutex);
        if (level == GGML_LOG_LEVEL_ERROR && g_llama_error.empty()) {
            g_llama_error = text;
            g_llama_error_open = true;
        } else if (level == GGML_LOG_LEVEL_CONT && g_llama_error_open) {
            g_llama_error += text;
        } else if (level != GGML_LOG_LEVEL_CONT) {
            g_llama_error_open = false;
        }
    }
    if (g_next_log) {
        g_next_log(level, text, g_next_log_data);
    }
}

void llama_fastgen_keep_llama_errors(void) {
    static std::once_flag once; // chained once: a second call could put us behind a callback that calls us
    std::call_once(once, [] {
        ggml_log_callback cb = nullptr;
        void * data = nullptr;
        llama_log_get(&cb, &data);
        g_next_log      = cb;
        g_next_log_data = data;
        llama_log_set(keep_llama_errors, nullptr);
    });
}

const char * llama_fastgen_llama_error(void) {
    std::lock_guard<std::mutex> lock(g_llama_error_mutex);
    g_llama_error_out = g_llama_error;
    return g_llama_error_out.c_str();
}

void llama_fastgen_clear_error(void) {
    llama_fastgen_set_last_error("");
    std::lock_guard<std::mutex> lock(g_llama_error_mutex);
    g_llama_error.clear();
    g_llama_error_open = false;
}

static const llama_kv_cache_fastgen * fastgen_cache(const llama_context * ctx) {
    return ctx ? dynamic_cast<const llama_kv_cache_fastgen *>(llama_get_memory(ctx)) : nullptr;
}

int32_t llama_fastgen_ctx_n_class(const llama_context * ctx) {
    const auto * kv = fastgen_cache(ctx);
    return kv ? (int32_t) kv->n_class() : 0;
}

const char * llama_fastgen_ctx_class_name(const llama_context * ctx, int32_t c) {
    static std::string name;
    name.clear();
    const auto * kv = fastgen_cache(ctx);
    if (kv && c >= 0 && (size_t) c < kv->n_class()) {
        name = kv->get_policy().describe_class(c);
    }
    return name.c_str();
}

size_t llama_fastgen_ctx_class_bytes(const llama_context * ctx, int32_t c) {
    const auto * kv = fastgen_cache(ctx);
    return kv && c >= 0 && (size_t) c < kv->n_class() ? kv->slice_bytes(c) : 0;
}

uint32_t llama_fastgen_ctx_class_cells(const llama_context * ctx, int32_t c) {
    const auto * kv = fastgen_cache(ctx);
    return kv && c >= 0 && (size_t) c < kv->n_class() ? kv->class_cells(c) : 0;
}

uint32_t llama_fastgen_ctx_class_used(const llama_context * ctx, int32_t c) {
    const auto * kv = fastgen_cache(ctx);
    return kv && c >= 0 && (size_t) c < kv->n_class() ? kv->class_used(c) : 0;
}

void llama_fastgen_ctx_mask_counts(const llama_context * ctx, uint64_t * filled, uint64_t * updated, uint64_t * mismatched) {
    const auto * kv = fastgen_cache(ctx);
    *filled     = kv ? kv->masks.filled : 0;
    *updated    = kv ? kv->masks.updated : 0;
    *mismatched = kv ? kv->masks.mismatched : 0;
}

int32_t llama_fastgen_ctx_class_dropped_upto(const llama_context * ctx, int32_t c, int32_t seq_id) {
    const auto * kv = fastgen_cache(ctx);
    return kv && c >= 0 && (size_t) c < kv->n_class() ? kv->class_dropped_upto(c, seq_id) : 0;
}

// the cache's bytes per buffer type, in a stable order (by name)
static std::vector<std::pair<std::string, size_t>> kv_by_buft(const llama_context * ctx) {
    const llama_memory_i * mem = ctx ? llama_get_memory(ctx) : nullptr;
    std::map<std::string, size_t> res;
    if (mem) {
        for (const auto & [buft, size] : mem->memory_breakdown()) {
            res[ggml_backend_buft_name(buft)] += size;
        }
    }
    return { res.begin(), res.end() };
}

size_t llama_fastgen_ctx_kv_bytes(const llama_context * ctx) {
    size_t n = 0;
    for (const auto & [_, size] : kv_by_buft(ctx)) {
        n += size;
    }
    return n;
}

int32_t llama_fastgen_ctx_kv_n_buft(const llama_context * ctx) {
    return (int32_t) kv_by_buft(ctx).size();
}

const char * llama_fastgen_ctx_kv_buft_name(const llama_context * ctx, int32_t i) {
    thread_local std::string name; // valid until the next call on this thread
    const auto all = kv_by_buft(ctx);
    name = i >= 0 && (size_t) i < all.size() ? all[i].first : "";
    return name.c_str();
}

size_t llama_fastgen_ctx_kv_buft_bytes(const llama_context * ctx, int32_t i) {
    const auto all = kv_by_buft(ctx);
    return i >= 0 && (size_t) i < all.size() ? all[i].second : 0;
}

size_t llama_fastgen_ctx_full_bytes(const llama_context * ctx) {
    const auto * kv = fastgen_cache(ctx);
    return kv ? kv->full_bytes() : llama_fastgen_ctx_kv_bytes(ctx);
}

bool llama_fastgen_ctx_make_removable(struct llama_context * ctx, int32_t seq_id, uint32_t n_tokens) {
    auto * kv = ctx ? dynamic_cast<llama_kv_cache_fastgen *>(llama_get_memory(ctx)) : nullptr;
    return !kv || kv->make_removable(seq_id, n_tokens);
}
