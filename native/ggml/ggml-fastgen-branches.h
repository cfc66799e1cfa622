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

// The node of a class's V rows that a class's K rows at node i pair with (both marked ROWS, ggml-fastgen.h), or -1:
// the next node that launches anything, with only views between (llama-graph-fastgen.cpp builds them one after the
// other), so one launch may write both where the K rows stand.
static inline int ggml_fastgen_rows_pair(const ggml_cgraph * g, int i) {
    if (!ggml_fastgen_marked(g->nodes[i], GGML_OP_SET_ROWS, GGML_FASTGEN_MARK_ROWS)) {
        return -1;
    }
    for (int m = i + 1; m < g->n_nodes; ++m) {
        const ggml_tensor * t = g->nodes[m];
        if (!ggml_fastgen_noop(t)) {
            return ggml_fastgen_marked(t, GGML_OP_SET_ROWS, GGML_FASTGEN_MARK_ROWS) ? m : -1;
        }
    }
    return -1;
}

// Whether a region's join can be left out (ggml-fastgen-fuse.cu): a one-token concat along rows of exactly two parts,
// the heavy-hitter op and the reshape of a class's flash attention (marked FA) computed in the region's first branch,
// each F32, contiguous, no graph output and read by nothing else, so the two can write their rows straight into the
// concat's buffer. The allocator keeps every tensor of the region alive until the join (ggml-fastgen-streams.cu), so
// that buffer overlaps nothing either branch reads, and it is free from the fork on. (CUDA also requires that the
// flash attention needs no scratch after its output: ggml-fastgen-streams.cu.) Returns that flash attention, or nullptr.
static inline const ggml_tensor * ggml_fastgen_join_in_place(const ggml_cgraph * g, const ggml_fastgen_branches & r) {
    const ggml_tensor * J = g->nodes[r.join];
    if (J->op != GGML_OP_CONCAT || ggml_get_op_params_i32(J, 0) != 0 || J->type != GGML_TYPE_F32 || !ggml_is_contiguous(J) ||
            J->ne[1] != 1 || J->ne[2] != 1 || J->ne[3] != 1) {
        return nullptr;
    }
    const ggml_tensor * H = r.op;
    const ggml_tensor * F = J->src[0] == H ? J->src[1] : J->src[0]; // the flash attention's reshape
    if ((J->src[0] != H && J->src[1] != H) || F == H || F->op != GGML_OP_RESHAPE ||
            !ggml_fastgen_marked(F->src[0], GGML_OP_FLASH_ATTN_EXT, GGML_FASTGEN_MARK_FA)) {
        return nullptr;
    }
    const ggml_tensor * FA = F->src[0];
    for (const ggml_tensor * t : { H, F, FA }) {
        if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || (t->flags & GGML_TENSOR_FLAG_OUTPUT)) {
            return nullptr;
        }
    }
    int in_first = 0; // the flash attention and its reshape run in branch 1, after the fork
    for (size_t k = 0; k < r.nodes.size(); ++k) {
        in_first += (r.nodes[k] == FA || r.nodes[k] == F) && r.branch[k] == 1;
    }
    if (in_first != 2) {
        return nullptr;
    }
    for (int k = 0; k < g->n_nodes; ++k) { // read by nothing else
        const ggml_tensor * t = g->nodes[k];
        if (t != F && t->view_src == FA) {
            return nullptr;
        }
        for (int s = 0; s < GGML_MAX_SRC; ++s) {
            const ggml_tensor * src = t->src[s];
            if ((t != J && (src == H || src == F)) || (t != F && src == FA)) {
                return nullptr;
            }
        }
    }
    return FA;
}
