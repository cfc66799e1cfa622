// llama-fastgen: the regions of a graph where a layer's heavy-hitter op can run beside the rest of its
// attention (ggml-fastgen-streams.cu says why and how). Plain C++ over the graph: no CUDA in here, so
// tests/test_branches.py checks the whole rule on the CPU.
#pragma once

#include "ggml.h"
#include "ggml-impl.h"
#include "ggml-fastgen.h"

#include <algorithm>
#include <cstdio>
#include <unordered_map>
#include <unordered_set>
#include <vector>

struct ggml_fastgen_branches {
    const ggml_tensor * op;                         // the heavy-hitter op
    int fork, join;                                 // node indices: the region is (fork, join)
    std::vector<const ggml_tensor *> nodes;         // the region's nodes, in graph order
    std::vector<int>                 branch;        // per node: 1 the rest of the attention, 2 the heavy-hitter op
};

// For each heavy-hitter op H of a decode step (query rows per head up to GGML_FASTGEN_HH_MAX_ROWS: a latency-bound
// launch that can hide behind the other branch; a prefill ubatch's kernels fill the GPU on their own) in a graph
// computed whole (op_params "beside": no eval callback, which could end a part of the graph inside a region):
// the join is the concat that first reads H; branch 2 is H and the views it
// reads through; the fork is the last node launching a kernel that H depends on (so everything H reads
// is computed before it, in stream order); branch 1 is every other node between fork and join, which must
// launch something and must not read branch 2. Views before the fork (llama.cpp reshapes V once for
// every head: "Vcur") are nobody's. debug: one line per heavy-hitter op on stderr.
static inline std::vector<ggml_fastgen_branches> ggml_fastgen_branch_regions(const ggml_cgraph * g, bool debug = false) {
    std::vector<ggml_fastgen_branches> out;
    std::unordered_map<const ggml_tensor *, int> idx;
    for (int i = 0; i < g->n_nodes; ++i) {
        idx[g->nodes[i]] = i;
    }
    for (int h = 0; h < g->n_nodes; ++h) {
        const ggml_tensor * H = g->nodes[h];
        if (H->op != GGML_OP_FASTGEN_HH_ATTN) {
            continue;
        }
        const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(H);
        if (!a.beside || !ggml_fastgen_hh_decode(&a)) {
            if (debug) {
                fprintf(stderr, "%s: %s: one stream (%s)\n", __func__, H->name, a.beside ? "prefill rows" : "eval callback");
            }
            continue;
        }
        int j = -1;
        for (int k = h + 1; k < g->n_nodes && j < 0; ++k) {
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                if (g->nodes[k]->src[s] == H) {
                    j = k;
                    break;
                }
            }
        }
        std::unordered_set<const ggml_tensor *> b2 = { H };
        std::vector<const ggml_tensor *> todo = { H };
        int f = -1;
        while (!todo.empty()) {
            const ggml_tensor * t = todo.back();
            todo.pop_back();
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                const ggml_tensor * src = t->src[s];
                const auto it = src ? idx.find(src) : idx.end();
                if (it == idx.end()) {
                    continue; // a leaf, or a node of another split
                }
                if (!ggml_fastgen_noop(src)) {
                    f = std::max(f, it->second);
                } else if (b2.insert(src).second) {
                    todo.push_back(src);
                }
            }
        }
        if (j < 0 || f < 0 || g->nodes[j]->op != GGML_OP_CONCAT || (!out.empty() && out.back().join > f)) {
            continue;
        }
        bool ok = true, work = false;
        for (auto it = b2.begin(); it != b2.end();) { // views before the fork are computed before it: neither branch's
            it = idx.at(*it) > f ? std::next(it) : b2.erase(it);
        }
        for (int k = f + 1; k < j && ok; ++k) {
            const ggml_tensor * t = g->nodes[k];
            ok = !(t->op == GGML_OP_FASTGEN_HH_ATTN && t != H); // one heavy-hitter op per region
            for (int s = 0; s < GGML_MAX_SRC && ok && !b2.count(t); ++s) {
                ok = !(t->src[s] && b2.count(t->src[s]));
            }
            work = work || (!b2.count(t) && !ggml_fastgen_noop(t));
        }
        if (debug) {
            fprintf(stderr, "%s: %s: fork %d (%s), join %d (%s), ok %d, work %d\n", __func__, H->name,
                    f, g->nodes[f]->name, j, g->nodes[j]->name, ok, work);
        }
        if (!ok || !work) {
            continue;
        }
        ggml_fastgen_branches r = { H, f, j, {}, {} };
        for (int k = f + 1; k < j; ++k) {
            r.nodes.push_back(g->nodes[k]);
            r.branch.push_back(b2.count(g->nodes[k]) ? 2 : 1);
        }
        out.push_back(std::move(r));
    }
    return out;
}
