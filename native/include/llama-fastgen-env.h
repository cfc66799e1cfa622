// The words llama-fastgen's environment switches take, defined once: libllama (llama-fastgen-model.cpp) and
// ggml-cuda (ggml_cuda_fastgen_env_switch in ggml-fastgen.cu: LLAMA_FASTGEN_CUDA_STREAMS, _PDL, _KBATCH,
// _FA_MMA, _FUSE and _HH_MAIN;
// it does not link libllama) both parse them here. Header-only C.
#pragma once

#include <ctype.h>

// 1 for 1/true/yes/on, 0 for 0/false/no/off (letters in any case), -1 for anything else
static inline int llama_fastgen_env_word(const char * v) {
    static const char * const words[8] = { "0", "false", "no", "off", "1", "true", "yes", "on" };
    for (int w = 0; w < 8; ++w) {
        const char * a = v, * b = words[w];
        while (*a && *b && tolower((unsigned char) *a) == *b) {
            ++a, ++b;
        }
        if (!*a && !*b) {
            return w >= 4;
        }
    }
    return -1;
}

// what the messages say a switch takes
#define LLAMA_FASTGEN_ENV_WORDS "1/true/yes/on or 0/false/no/off"
