// llama-fastgen: C API added to libllama (bound from Python with cffi).
// Only new functions: llama_context_params / llama_model_params stay exactly as upstream.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of llama-fastgen compiled into this libllama, e.g. "0.1.0".
LLAMA_API const char * llama_fastgen_version(void);

// llama.cpp commit this library was built from (the tree pinned by llama-cpp-python).
LLAMA_API const char * llama_fastgen_llama_commit(void);

// Comma-separated names of the ggml backends registered in this process, e.g. "CPU" or "CUDA,CPU".
LLAMA_API const char * llama_fastgen_backends(void);

// llama.cpp's RPC backend (ggml-rpc), as its rpc-server and --rpc drive it; for Python, whose
// llama-cpp-python 0.3.36 has no rpc_servers argument. Both return false with llama_fastgen_last_error()
// set when this build has no RPC backend or the server does not answer.
// Register the devices of the RPC server at endpoint ("host:port"): models loaded afterwards with GPU
// layers split their layers (and their caches) over every registered device.
LLAMA_API bool llama_fastgen_rpc_add_server(const char * endpoint);
// Serve this process's CPU backend at endpoint ("host:port") with n_threads; returns only on error.
LLAMA_API bool llama_fastgen_rpc_serve(const char * endpoint, int32_t n_threads);

// Message of the last fastgen error (why a fastgen GGUF, context or saved state was refused), "" if
// none; clear it before a call to tell its error from an older one.
LLAMA_API const char * llama_fastgen_last_error(void);
LLAMA_API void         llama_fastgen_clear_error(void);
// llama.cpp's own reason for a refusal (a tensor of the wrong shape, a truncated file): the first
// error-level line it logged since llama_fastgen_clear_error, "" if none. Kept once
// llama_fastgen_keep_llama_errors has put a log callback in front of the one set before (llama-cpp-python's,
// silenced by verbose=False during a load), which still receives every line.
LLAMA_API void         llama_fastgen_keep_llama_errors(void);
LLAMA_API const char * llama_fastgen_llama_error(void);

// Number of classes of the context's cache: 0 when it is an ordinary cache.
LLAMA_API int32_t llama_fastgen_ctx_n_class(const struct llama_context * ctx);

// Label of class c as the context's cache runs it: windows and budgets grown with n_ctx when the
// GGUF sets fastgen.budget_ctx below n_ctx ("" if out of range).
LLAMA_API const char * llama_fastgen_ctx_class_name(const struct llama_context * ctx, int32_t c);

// Per class c of a fastgen context: allocated K+V bytes (frequent classes: + F32 scores), capacity in
// cells, occupied cells (frequent classes: per head, the most any (layer, head) holds).
LLAMA_API size_t   llama_fastgen_ctx_class_bytes(const struct llama_context * ctx, int32_t c);
LLAMA_API uint32_t llama_fastgen_ctx_class_cells(const struct llama_context * ctx, int32_t c);
LLAMA_API uint32_t llama_fastgen_ctx_class_used (const struct llama_context * ctx, int32_t c);

// Per class c of a fastgen context: the position below which protected tokens of sequence seq_id
// were dropped because the class's cells ran out (0: none dropped).
LLAMA_API int32_t llama_fastgen_ctx_class_dropped_upto(const struct llama_context * ctx, int32_t c, int32_t seq_id);

// Tail rollback: can n_tokens evaluated next as one ubatch in sequence seq_id be removed again exactly
// (llama_memory_seq_rm of their positions), so that no checkpoint is needed before them? Heavy-hitter
// heads run now the eviction that ubatch would run before it (the same one; it stays after a removal),
// then the answer. True for a cache without compressed classes; with heavy-hitter heads it needs the kv
// override fastgen.undo_tokens >= n_tokens, and on CUDA a decode-sized ubatch.
LLAMA_API bool llama_fastgen_ctx_make_removable(struct llama_context * ctx, int32_t seq_id, uint32_t n_tokens);

// K+V bytes allocated by the context's cache (any cache type), and what an ordinary full cache
// of the same n_ctx and types takes (equal for an ordinary cache).
LLAMA_API size_t llama_fastgen_ctx_kv_bytes  (const struct llama_context * ctx);
LLAMA_API size_t llama_fastgen_ctx_full_bytes(const struct llama_context * ctx);

// The same K+V bytes per buffer type, i.e. where they live when layers are split over devices: the
// number of buffer types, then for 0 <= i < that number its name (ggml's, e.g. "CPU", "CUDA0",
// "RPC0[127.0.0.1:50052]") and bytes ("" and 0 out of range). They add up to llama_fastgen_ctx_kv_bytes.
LLAMA_API int32_t      llama_fastgen_ctx_kv_n_buft    (const struct llama_context * ctx);
LLAMA_API const char * llama_fastgen_ctx_kv_buft_name (const struct llama_context * ctx, int32_t i);
LLAMA_API size_t       llama_fastgen_ctx_kv_buft_bytes(const struct llama_context * ctx, int32_t i);

// Class masks of decode steps (one token of one sequence, classes without a window): how many were filled
// over every cell (llama.cpp's fill) and how many updated from the last step's (only the new token's cell
// changes), and, with the environment variable LLAMA_FASTGEN_CHECK_MASK=1 (which fills updated masks in full
// as well and uses that), how many updates differed from the fill. 0 for an ordinary cache.
LLAMA_API void llama_fastgen_ctx_mask_counts(const struct llama_context * ctx, uint64_t * filled, uint64_t * updated,
                                             uint64_t * mismatched);

#ifdef __cplusplus
}
#endif
