// llama-fastgen: CUDA implementation of GGML_OP_FASTGEN_HH_ATTN (see ggml-fastgen.h), compiled into
// ggml-cuda; its reference is ggml_compute_forward_fastgen_hh_attn in ggml-fastgen-cpu.cpp.
#pragma once

#include "common.cuh"

void ggml_cuda_fastgen_hh_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_fastgen_hh_attn_supported(int device, const ggml_tensor * op);

// fattn.cu (patch 0002): a decode step of this flash attention runs on the MMA kernel instead of the vector kernel;
// true for the attentions llama-fastgen marked (ggml-fastgen.h) unless LLAMA_FASTGEN_CUDA_FA_MMA=0
bool ggml_cuda_fastgen_fa_mma(const ggml_tensor * dst);

// the CUDA side's LLAMA_FASTGEN_CUDA_* switches (the words: llama-fastgen-env.h): unset or empty -> `unset`; with
// allow_2 also "2"; anything else warns, naming what `unset` means, and gives `unset`
int ggml_cuda_fastgen_env_switch(const char * name, int unset, bool allow_2, const char * unset_means);

// ggml-cuda's graph_optimize when GGML_CUDA_GRAPH_OPT is off: in decode, a layer's full-class attention and its
// heavy-hitter op on two streams (ggml-fastgen-streams.cu; LLAMA_FASTGEN_CUDA_STREAMS=0: one)
struct ggml_backend_graph_optimize_params;
void ggml_cuda_fastgen_graph_optimize(ggml_backend_cuda_context * ctx, ggml_cgraph * cgraph,
                                      ggml_backend_graph_optimize_params * params, bool use_cuda_graph);

// ggml-fastgen-fuse.cu: launches a decode step of a mixed layer saves (patch 0002's hooks). try_fuse: a class's K and
// V rows in one launch at its K rows' node i (returns the nodes done after i, else 0); compute_forward: true when it
// computed dst itself (a class's flash attention into its slot of the layer's concat) or dst needs nothing (that
// concat); hh_out: where the heavy-hitter op writes its rows (its slot of that concat, else its own buffer)
int     ggml_cuda_fastgen_try_fuse(ggml_backend_cuda_context & ctx, ggml_cgraph * cgraph, int i);
bool    ggml_cuda_fastgen_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
float * ggml_cuda_fastgen_hh_out(ggml_backend_cuda_context & ctx, const ggml_tensor * dst);
