// llama-fastgen: a layer that mixes full heads with heavy-hitter heads may run its two attentions side by side.
//
// In such a layer the full class writes its new K/V rows and runs flash attention over its cells, and the
// heavy-hitter op attends over its store; neither reads what the other writes, and a concat joins them.
// In one stream they run one after the other: at depth 0 on an H100 (session 30, ncu) a mixed layer's
// attention kernels took 27.6 us against the full cache's 12.7 us, the heavy-hitter op 8.7 us of it. Here
// they become two branches of llama.cpp's own concurrent-stream machinery (ggml_cuda_concurrent_event,
// which GGML_CUDA_GRAPH_OPT=1 uses for Q/K/V): branch 1 the full class, branch 2 the heavy-hitter op,
// forked after the last node the op depends on, joined at the concat (ggml-fastgen-branches.h finds
// them). Only where CUDA graphs are enabled, as there (warm-up steps then run the two streams eagerly).
// Not with an eval callback (imatrix, llama-eval-callback): llama.cpp then computes parts of the graph, a
// part can end inside a region, and nothing would join the streams there (GGML_CUDA_GRAPH_OPT has the same
// hole); the graph builder marks such a context's ops (ggml-fastgen.h, beside = 0) and they keep one stream.
//
// Lifetimes: the allocator assumes one stream, so a tensor freed inside the region could be reused by the
// other branch while still being read. Every tensor read or written in the region is kept until the join
// (add_alloc_dep), so nothing is freed or reused until both branches have joined.
//
// Only for the decode kernel (the finder skips prefill ops): there the op is a latency-bound launch that can
// hide behind the other branch. Beside a prefill ubatch's kernels, which fill the GPU on their own, pp8192
// ran 1-3.5% slower on two streams (session 31, H100).
//
// Which stream: the heavy-hitter op, the longer branch, stays on the main stream and the rest of the attention goes to
// a side stream (patch 0002 lets is_valid see a branch on stream 0). The main stream's kernels chain by programmatic
// dependent launch, which a wait on another stream's event breaks: so the op keeps that overlap with the kernels
// before and after it, and the join waits for one side stream, not two (session 39's timeline: a mixed layer reached
// its output projection's end 2.1 us after a heavy-hitter-only layer, its attention only 0.8 us later).
// LLAMA_FASTGEN_CUDA_HH_MAIN=0 puts both branches on side streams (a diagnostic: bench_gpu.py's 'diag fastgen hh-side').
// LLAMA_FASTGEN_CUDA_STREAMS=0 keeps one stream; =2 also prints per op what the finder decided, and per graph how many
// joins ggml-fastgen-fuse.cu leaves out.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"
#include "ggml-fastgen-branches.h"

#include "fattn.cuh"

#include "ggml-backend-impl.h"

#include <utility>

void ggml_cuda_fastgen_graph_optimize(ggml_backend_cuda_context * ctx, ggml_cgraph * g,
                                      ggml_backend_graph_optimize_params * params, bool use_cuda_graph) {
    ggml_cuda_stream_context & sc = ctx->stream_context();
    sc.reset();
    // 0: one stream; 1 (default): two; 2: two, and one line per op on stderr
    static const int mode = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_STREAMS", 1, true, "two streams in decode");
    static const bool hh_main = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_HH_MAIN", 1, false, "the op on the main stream") != 0;
    if (mode == 0 || !use_cuda_graph || !params) {
        return;
    }
    const std::vector<ggml_fastgen_branches> regions = ggml_fastgen_branch_regions(g, mode == 2);
    if (!regions.empty()) {
        ggml_cuda_set_device(ctx->device); // the events below belong to this device
    }
    int n_in_place = 0;
    for (const ggml_fastgen_branches & r : regions) {
        ggml_tensor * join = g->nodes[r.join];
        ggml_cuda_concurrent_event ev(hh_main ? 1 : 2); // side streams: 1 .. n
        ev.join_node = join;
        ev.original_order = r.nodes;
        for (size_t k = 0; k < r.nodes.size(); ++k) {
            const ggml_tensor * t = r.nodes[k];
            ev.stream_mapping[t] = hh_main ? (r.branch[k] == 2 ? 0 : 1) : r.branch[k];
            params->add_alloc_dep(params->user_data, const_cast<ggml_tensor *>(t), join);
            for (int s = 0; s < GGML_MAX_SRC; ++s) { // every source: by now the split's inputs are plain copies
                if (t->src[s]) {                       // (no INPUT flag), and the allocator keeps what it does not own anyway
                    params->add_alloc_dep(params->user_data, t->src[s], join);
                }
            }
        }
        // its parts written into its buffer (ggml-fastgen-fuse.cu), unless the flash attention keeps F16 copies of K
        // and V after its output (a cache of another type): that scratch is allocated with its own buffer only
        const ggml_tensor * fa = ggml_fastgen_join_in_place(g, r);
        if (fa && ggml_cuda_flash_attn_ext_get_alloc_size(ctx->device, fa) == ggml_nbytes(fa)) {
            ggml_fastgen_mark(join, GGML_FASTGEN_MARK_JOIN);
            n_in_place++;
        }
        sc.concurrent_events.emplace(g->nodes[r.fork], std::move(ev));
    }
    GGML_LOG_DEBUG("%s: %zu heavy-hitter ops beside their layer's other attention on a side stream\n", __func__, regions.size());
    if (mode == 2) {
        fprintf(stderr, "%s: %zu regions, %d of their joins written in place\n", __func__, regions.size(), n_in_place);
    }
}
