// llama-fastgen: the three hooks llama.cpp calls (native/patches): load the policy with the model,
// force flash attention for contexts of fastgen models, create the per-class cache.
#pragma once

#include <memory>
#include <string>

struct llama_model;
struct llama_cparams;
struct llama_memory_params;
struct llama_model_loader;
struct llama_fastgen_policy;
struct llama_memory_i;

// nullptr when the GGUF has no fastgen.* keys; throws (model load fails) when they are invalid
std::shared_ptr<llama_fastgen_policy> llama_fastgen_load_policy(llama_model_loader & ml, const llama_model & model);

void llama_fastgen_adjust_cparams(const llama_model & model, llama_cparams & cparams);

// nullptr: build the ordinary cache
llama_memory_i * llama_fastgen_create_memory(const llama_model & model, const llama_memory_params & params,
                                             const llama_cparams & cparams);

// the LLAMA_FASTGEN_* switches of the host side, each its name and its value when unset or empty, in one place:
// llama_fastgen_load_policy checks every one, the code reads each where it acts
struct llama_fastgen_switch {
    const char * name;
    bool         unset;
};
inline constexpr llama_fastgen_switch LLAMA_FASTGEN_SWITCH_DISABLE    = { "LLAMA_FASTGEN_DISABLE",    false };
inline constexpr llama_fastgen_switch LLAMA_FASTGEN_SWITCH_HH_FUSED   = { "LLAMA_FASTGEN_HH_FUSED",   true  };
inline constexpr llama_fastgen_switch LLAMA_FASTGEN_SWITCH_TIMING     = { "LLAMA_FASTGEN_TIMING",     false };
inline constexpr llama_fastgen_switch LLAMA_FASTGEN_SWITCH_CHECK_MASK = { "LLAMA_FASTGEN_CHECK_MASK", false };
// every fastgen input a view of one graph input's copy (llama-graph-fastgen.cpp): 1 on any backend, 0 never; unset,
// where the whole cache is in one device's memory (the cache's constructor decides, llama-kv-cache-fastgen.cpp)
inline constexpr llama_fastgen_switch LLAMA_FASTGEN_SWITCH_INPUT_COPY = { "LLAMA_FASTGEN_INPUT_COPY", false };

// a switch's value: 1/true/yes/on or 0/false/no/off, its `unset` when unset or empty; anything else
// throws (a typo must run neither path silently)
bool llama_fastgen_env_flag(const llama_fastgen_switch & sw);
// the same where nothing may throw (a static initializer, a graph build inside llama_decode): `unset` for a
// value the load refuses anyway
bool llama_fastgen_env_flag_or_unset(const llama_fastgen_switch & sw) noexcept;
// 1 or 0 as llama_fastgen_env_flag, -1 when unset or empty (where unset means "decide from something else")
int llama_fastgen_env_tristate(const llama_fastgen_switch & sw);

// message of the last policy error (empty if none), for llama_fastgen_last_error()
const std::string & llama_fastgen_last_error_str();
void llama_fastgen_set_last_error(const std::string & what);
// refuse a call that returns nothing in llama.cpp's API (seq_add, seq_div, seq_cp): logged as an error from
// func, and kept as the last error, which Python raises (llama_fastgen._lib._raise_refusals)
void llama_fastgen_refuse(const char * func, const std::string & why);
