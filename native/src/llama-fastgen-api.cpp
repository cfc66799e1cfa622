// Exported llama_fastgen_* C functions: version and build facts.
#include "llama-fastgen.h"

#include "ggml-backend.h"

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
