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

#ifdef __cplusplus
}
#endif
