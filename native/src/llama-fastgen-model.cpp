#include "llama-fastgen-model.h"

#include "llama-fastgen-env.h"

#include "llama-cparams.h"
#include "llama-fastgen-policy.h"
#include "llama-impl.h"
#include "llama-kv-cache-fastgen.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <cstdlib>
#include <stdexcept>

static std::string g_last_error;

const std::string & llama_fastgen_last_error_str() {
    return g_last_error;
}

void llama_fastgen_set_last_error(const std::string & what) {
    g_last_error = what;
}

void llama_fastgen_refuse(const char * func, const std::string & why) {
    LLAMA_LOG_ERROR("%s: %s\n", func, why.c_str());
    g_last_error = why;
}

static bool arch_supported(llm_arch arch) {
    // architectures whose graphs go through build_attn_inp_kv + build_attn and whose heads the
    // converter knows how to permute
    return arch == LLM_ARCH_LLAMA || arch == LLM_ARCH_QWEN2 || arch == LLM_ARCH_QWEN3 || arch == LLM_ARCH_MISTRAL3;
}

// fastgen.enable as a bool, an int 0/1 or a string true/false/0/1 (front ends differ in what they
// pass: llama-cpp-python a bool, llama-cli's --override-kv whatever type is named); anything else is
// refused rather than silently ignored
static bool override_enabled(const llama_model_kv_override & ov) {
    switch (ov.tag) {
        case LLAMA_KV_OVERRIDE_TYPE_BOOL: return ov.val_bool;
        case LLAMA_KV_OVERRIDE_TYPE_INT:
            if (ov.val_i64 == 0 || ov.val_i64 == 1) {
                return ov.val_i64 == 1;
            }
            break;
        case LLAMA_KV_OVERRIDE_TYPE_STR: {
            const std::string v = ov.val_str;
            if (v == "true" || v == "1" || v == "false" || v == "0") {
                return v == "true" || v == "1";
            }
            break;
        }
        default: break;
    }
    throw std::runtime_error("fastgen: kv_overrides " LLAMA_FASTGEN_KEY_ENABLE " must be true/false (a bool, 0/1 or the "
            "string true/false)");
}

static uint32_t override_undo_tokens(const llama_model_kv_override & ov) {
    if (ov.tag == LLAMA_KV_OVERRIDE_TYPE_INT && ov.val_i64 >= 0 && ov.val_i64 <= LLAMA_FASTGEN_MAX_UNDO_TOKENS) {
        return (uint32_t) ov.val_i64;
    }
    throw std::runtime_error(format("fastgen: kv_overrides %s must be an int from 0 to %d (tokens)",
            LLAMA_FASTGEN_KEY_UNDO_TOKENS, LLAMA_FASTGEN_MAX_UNDO_TOKENS));
}

bool llama_fastgen_env_flag(const llama_fastgen_switch & sw) {
    const char * e = std::getenv(sw.name);
    if (!e || !*e) {
        return sw.unset;
    }
    const int w = llama_fastgen_env_word(e);
    if (w < 0) {
        throw std::runtime_error(format("fastgen: %s=%s: expected " LLAMA_FASTGEN_ENV_WORDS ", or leave it unset", sw.name, e));
    }
    return w == 1;
}

int llama_fastgen_env_tristate(const llama_fastgen_switch & sw) {
    const char * e = std::getenv(sw.name);
    return e && *e ? (int) llama_fastgen_env_flag(sw) : -1;
}

bool llama_fastgen_env_flag_or_unset(const llama_fastgen_switch & sw) noexcept {
    try {
        return llama_fastgen_env_flag(sw);
    } catch (...) {
        return sw.unset;
    }
}

std::shared_ptr<llama_fastgen_policy> llama_fastgen_load_policy(llama_model_loader & ml, const llama_model & model) {
    g_last_error.clear();
    try {
        auto policy = llama_fastgen_policy::load(ml.metadata, model.hparams, model.vocab.n_tokens());
        if (!policy) {
            // an override that asks for the fastgen cache of a GGUF without one would silently run the full cache
            for (const auto & [key, ov] : ml.kv_overrides) {
                if (key.rfind(LLAMA_FASTGEN_KEY_PREFIX, 0) == 0 && !(key == LLAMA_FASTGEN_KEY_ENABLE && !override_enabled(ov))) {
                    throw std::runtime_error(format("fastgen: kv_overrides %s, but this GGUF has no fastgen policy "
                            "(no fastgen.* keys): convert the model with convert.py --profile, or drop the override",
                            key.c_str()));
                }
            }
            return nullptr;
        }
        if (!arch_supported(model.arch)) {
            throw std::runtime_error(format("fastgen: architecture %s is not supported by the fastgen cache "
                    "(supported: llama, qwen2, qwen3, mistral3)", llm_arch_name(model.arch)));
        }
        if (model.hparams.is_swa_any()) {
            throw std::runtime_error("fastgen: models with sliding-window layers are not supported");
        }
        for (const auto & [key, ov] : ml.kv_overrides) {
            if (key.rfind(LLAMA_FASTGEN_KEY_PREFIX, 0) != 0) {
                continue;
            }
            if (key == LLAMA_FASTGEN_KEY_UNDO_TOKENS) {
                policy->undo_tokens = override_undo_tokens(ov);
                continue;
            }
            if (key != LLAMA_FASTGEN_KEY_ENABLE) { // the policy table is the converter's to write, not an override's
                throw std::runtime_error(format("fastgen: kv_overrides %s is not supported: only " LLAMA_FASTGEN_KEY_ENABLE " "
                        "(true/false) and " LLAMA_FASTGEN_KEY_UNDO_TOKENS " (a number of tokens) can be overridden; re-run "
                        "convert.py --profile to change the policies", key.c_str()));
            }
            policy->enabled = override_enabled(ov);
        }
        if (llama_fastgen_env_flag(LLAMA_FASTGEN_SWITCH_DISABLE)) { // 1: the full cache, for any program
            policy->enabled = false;
        }
        // read where they act (once per process mid-run, INPUT_COPY per context); a typo fails the load here instead
        for (const auto & sw : { LLAMA_FASTGEN_SWITCH_HH_FUSED, LLAMA_FASTGEN_SWITCH_TIMING, LLAMA_FASTGEN_SWITCH_CHECK_MASK, LLAMA_FASTGEN_SWITCH_INPUT_COPY }) {
            llama_fastgen_env_flag(sw);
        }
        LLAMA_LOG_INFO("%s: fastgen policy: %zu classes, T = %.2f, %u sinks%s\n", __func__, policy->classes.size(),
                policy->threshold, policy->n_sink, policy->enabled ? "" : " (disabled: full cache)");
        return policy;
    } catch (const std::exception & e) {
        g_last_error = e.what();
        throw;
    }
}

// Also with every head full: the composite then runs one slice holding all heads, which is
// what the "all full == fastgen off" oracle checks.
static bool active(const llama_model & model) {
    return model.fastgen && model.fastgen->enabled;
}

void llama_fastgen_adjust_cparams(const llama_model & model, llama_cparams & cparams) {
    if (active(model) && !cparams.flash_attn) {
        LLAMA_LOG_INFO("%s: fastgen: enabling flash attention (per-class V slices would be padded without it)\n", __func__);
        cparams.flash_attn = true;
        cparams.auto_fa    = false;
    }
}

llama_memory_i * llama_fastgen_create_memory(const llama_model & model, const llama_memory_params & params,
                                             const llama_cparams & cparams) {
    if (!active(model)) {
        return nullptr;
    }
    g_last_error.clear();
    try {
        return new llama_kv_cache_fastgen(model, model.fastgen, params.type_k, params.type_v, !cparams.flash_attn,
                cparams.offload_kqv, cparams.kv_unified, cparams.n_ctx_seq, cparams.n_seq_max, cparams.n_ubatch);
    } catch (const std::exception & e) {
        g_last_error = e.what(); // llama_init_from_model only logs it; Python reads it back
        throw;
    }
}
