// llama-fastgen: a layer that mixes full heads with heavy-hitter heads runs its two attentions side by side.
//
// In such a layer the full class writes its new K/V rows and runs flash attention over its cells, and the
// heavy-hitter op attends over its store; neither reads what the other writes, and a concat joins them.
// In one stream they run one after the other: at depth 0 on an H100 (session 30, ncu) a mixed layer's
// attention kernels took 27.7 us against the full cache's 12.7 us, the heavy-hitter op 8.8 us of it. Here
// they become two branches of llama.cpp's own concurrent-stream machinery (ggml_cuda_concurrent_event,
// which GGML_CUDA_GRAPH_OPT=1 uses for Q/K/V): branch 1 the full class, branch 2 the heavy-hitter op,
// forked after the last node the op depends on, joined at the concat. Only under CUDA graphs, as there.
//
// Lifetimes: the allocator assumes one stream, so a tensor freed inside the region could be reused by the
// other branch while still being read. Every tensor read or written in the region is kept until the join
// (add_alloc_dep), so nothing is freed or reused until both branches have joined.
//
// LLAMA_FASTGEN_CUDA_STREAMS=0 keeps one stream (A/B measurements, debugging).
#include "ggml-fastgen.cuh"

#include "ggml-backend-impl.h"

#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <unordered_set>
#include <vector>

static bool fg_noop(const ggml_tensor * t) { // as ggml-cuda's ggml_cuda_is_view_or_noop: launches nothing
    return ggml_is_empty(t) || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_TRANSPOSE || t->op == GGML_OP_VIEW ||
           t->op == GGML_OP_PERMUTE || t->op == GGML_OP_NONE;
}

// a tensor the allocator could free (a node, or an input in the compute buffer), so worth keeping alive
static bool fg_freeable(const ggml_tensor * t) {
    return t->op != GGML_OP_NONE || (t->flags & GGML_TENSOR_FLAG_INPUT);
}

void ggml_cuda_fastgen_graph_optimize(ggml_backend_cuda_context * ctx, ggml_cgraph * g,
                                      ggml_backend_graph_optimize_params * params, bool use_cuda_graph) {
    ggml_cuda_stream_context & sc = ctx->stream_context();
    sc.reset();
    static const bool on = [] {
        const char * e = getenv("LLAMA_FASTGEN_CUDA_STREAMS");
        return e == nullptr || strcmp(e, "0") != 0;
    }();
    if (!on || !use_cuda_graph || !params) {
        return;
    }
    std::unordered_map<const ggml_tensor *, int> idx;
    for (int i = 0; i < g->n_nodes; ++i) {
        idx[g->nodes[i]] = i;
    }
    for (int h = 0; h < g->n_nodes; ++h) {
        ggml_tensor * H = g->nodes[h];
        if (H->op != GGML_OP_FASTGEN_HH_ATTN) {
            continue;
        }
        // the join: the first later node that reads the op's output
        int j = -1;
        for (int k = h + 1; k < g->n_nodes && j < 0; ++k) {
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                if (g->nodes[k]->src[s] == H) {
                    j = k;
                    break;
                }
            }
        }
        // branch 2: the op and the views it reads through; the fork: the last node launching a kernel that
        // the op depends on (what the op reads was computed before it, in stream order)
        std::unordered_set<const ggml_tensor *> b2 = { H };
        std::vector<const ggml_tensor *> todo = { H };
        int f = -1;
        while (!todo.empty()) {
            const ggml_tensor * t = todo.back();
            todo.pop_back();
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                const ggml_tensor * src = t->src[s];
                auto it = src ? idx.find(src) : idx.end();
                if (it == idx.end()) {
                    continue; // a leaf, or a node of another split
                }
                if (!fg_noop(src)) {
                    f = std::max(f, it->second);
                } else if (b2.insert(src).second) {
                    todo.push_back(src);
                }
            }
        }
        if (j < 0 || f < 0 || f >= h || g->nodes[j]->op != GGML_OP_CONCAT) {
            continue;
        }
        // branch 1: every other node between fork and join; it must launch something, must not read branch 2,
        // and branch 2's views must lie between fork and join
        std::vector<const ggml_tensor *> region;
        bool ok = true, work = false;
        for (int k = f + 1; k < j && ok; ++k) {
            const ggml_tensor * t = g->nodes[k];
            const bool in2 = b2.count(t) > 0;
            ok = !(t->op == GGML_OP_FASTGEN_HH_ATTN && t != H); // one heavy-hitter op per region
            for (int s = 0; s < GGML_MAX_SRC && ok && !in2; ++s) {
                ok = !(t->src[s] && b2.count(t->src[s]));
            }
            work = work || (!in2 && !fg_noop(t));
            region.push_back(t);
        }
        for (const ggml_tensor * t : b2) {
            const auto it = idx.find(t);
            ok = ok && it != idx.end() && it->second > f && it->second < j;
        }
        if (!ok || !work || sc.concurrent_events.count(g->nodes[f])) {
            continue;
        }
        ggml_cuda_set_device(ctx->device); // the events below belong to this device
        ggml_cuda_concurrent_event ev(2);
        ev.join_node = g->nodes[j];
        ev.original_order = region;
        for (const ggml_tensor * t : region) {
            ev.stream_mapping[t] = b2.count(t) ? 2 : 1;
            params->add_alloc_dep(params->user_data, const_cast<ggml_tensor *>(t), g->nodes[j]);
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                if (t->src[s] && fg_freeable(t->src[s])) {
                    params->add_alloc_dep(params->user_data, t->src[s], g->nodes[j]);
                }
            }
        }
        sc.concurrent_events.emplace(g->nodes[f], std::move(ev));
    }
}
