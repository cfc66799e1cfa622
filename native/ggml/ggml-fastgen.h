// llama-fastgen: GGML_OP_FASTGEN_HH_ATTN, the fused attention step of the heavy-hitter (frequent) store
// (decode and prefill, on the CPU and CUDA; other backends use the composed path).
//
// For each KV head j of one layer's frequent range, in one op instead of ~12 small ones:
//   1. write the ubatch's new K and V rows into the head's cells c = idxs[t, h0 + j] (rounded to F16), and
//      P[c, j] = query_pos[t] - 0.5;
//   2. for each query row r = t*G + g: p = softmax(scale * q_r . K[:, c, j]) over the cells c with
//      query_pos[t] - P[c, j] > 0 (occupied and not after the query), out_r = sum_c p_c V[c, :, j];
//   3. S[c, j] = keep * S[c, j] + sum over r of p_r[c]  (the accumulated attention, FastGen/H2O), with
//      keep = 0 for the new cells and free cells (P = +inf), else 1. Only occupied cells' scores are
//      defined: the CUDA kernel skips 64-cell chunks that no query sees (the CPU path zeroes them).
// The same function as the composed ggml path of llama-graph-fastgen.cpp (set_rows, mul_mat,
// soft_max_ext, column sums, mul/add in place, with the mask and keep from host inputs), which
// stays for backends without the op and is the reference the fused op is checked against.
//
// Sources (F32 unless noted; "view" = any row strides, contiguous rows):
//   0 q         [D, G*n, T]  view       1 k_cur [D, n, T] view     2 v_cur [Dv, n, T] view
//   3 idxs      [T, >= h0+n] I64        4 K     [D, C, n] F16      5 V     [C, Dv, n] F16 (transposed)
//   6 S         [C, n]                  7 P     [C + GGML_FASTGEN_HH_P_PAD, n]: cell positions - 0.5,
//   8 query_pos [T] (any shape)                            +inf when free; the row's padding starts at zero
//                                                  (the CUDA kernel counts its finished blocks in its
//                                                  first element and leaves it at zero); its second is
//                                                  hi, cells [hi, C) are free: the host writes it with
//                                                  the positions, the CUDA kernels raise it as they place
//                                                  tokens (a bound, not exact: cells below may be free)
//   9 U (optional; the CPU op's and CUDA's decode paths take it) [C, n, R]: U[c, j, pos_t % R] = sum over g of p_{t*G+g}[c],
//     each token's own addition to the scores, kept so that the store can take a removed token's attention
//     out of them again (tail rollback, llama-kv-cache-fastgen-hh.h)
// idxs and query_pos are the whole graph inputs, shared by every layer: a per-layer view of a host
// input would be one more host-to-device copy per layer and token.
// Precision: the CPU paths and the CUDA decode kernel take q in F32; the CUDA prefill kernels round q to
// F16 for the tensor cores, as llama.cpp's CUDA flash attention does (logits accumulate in F32).
// op_params: float scale, int32 h0 (this layer's first row in idxs), int32 beside (1: the graph is computed
// whole, with no eval callback between its nodes, so CUDA may run the op on a second stream beside the rest of
// its layer's attention: ggml-fastgen-branches.h). Result: F32 [Dv*G*n, T], heads in q order (kv head j, then group g).
// K, V, S and P are updated in place (they live in the cache's buffers, outside the graph allocator).
#pragma once

#include "ggml.h"
#include "llama-fastgen-contract.h"

#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ggml_fastgen_hh_src {
    GGML_FASTGEN_HH_Q, GGML_FASTGEN_HH_K_CUR, GGML_FASTGEN_HH_V_CUR, GGML_FASTGEN_HH_IDXS,
    GGML_FASTGEN_HH_K, GGML_FASTGEN_HH_V, GGML_FASTGEN_HH_S, GGML_FASTGEN_HH_P, GGML_FASTGEN_HH_QUERY_POS,
    GGML_FASTGEN_HH_U,
};

// floats after each head's cell positions (the contract's: the store's bytes count them)
#define GGML_FASTGEN_HH_P_PAD LLAMA_FASTGEN_HH_POS_PAD
// query rows (group size x tokens) per head up to which the decode paths run (CPU: heads over
// threads; CUDA: one launch, a block per 64 cells); longer ubatches take the prefill paths
#define GGML_FASTGEN_HH_MAX_ROWS 32
// head sizes the CUDA kernel takes: multiples of the warp size up to this
#define GGML_FASTGEN_HH_MAX_D 256
// cells per head the CUDA kernel takes (its merge step keeps one weight per 64 cells and row in shared memory)
#define GGML_FASTGEN_HH_MAX_CELLS 16384

// the op's sources, shapes and parameters, unpacked in one place for every implementation
struct ggml_fastgen_hh_args {
    const struct ggml_tensor * q, * k_cur, * v_cur, * idxs, * query_pos;
    struct ggml_tensor       * K, * V, * S, * P, * U; // U: NULL when not recorded
    int64_t D, C, n, Dv, T, G; // head size, cells, KV heads, V head size, tokens, query heads per KV head
    float   scale;
    int32_t h0;
    int32_t beside;
};

static inline struct ggml_fastgen_hh_args ggml_fastgen_hh_unpack(const struct ggml_tensor * dst) {
    struct ggml_fastgen_hh_args a;
    a.q     = dst->src[GGML_FASTGEN_HH_Q];
    a.k_cur = dst->src[GGML_FASTGEN_HH_K_CUR];
    a.v_cur = dst->src[GGML_FASTGEN_HH_V_CUR];
    a.idxs  = dst->src[GGML_FASTGEN_HH_IDXS];
    a.K     = dst->src[GGML_FASTGEN_HH_K];
    a.V     = dst->src[GGML_FASTGEN_HH_V];
    a.S     = dst->src[GGML_FASTGEN_HH_S];
    a.P     = dst->src[GGML_FASTGEN_HH_P];
    a.query_pos = dst->src[GGML_FASTGEN_HH_QUERY_POS];
    a.U     = dst->src[GGML_FASTGEN_HH_U];
    a.D  = a.K->ne[0];
    a.C  = a.K->ne[1];
    a.n  = a.K->ne[2];
    a.Dv = a.V->ne[1];
    a.T  = a.q->ne[2];
    a.G  = a.q->ne[1]/a.n;
    memcpy(&a.scale, dst->op_params, sizeof(float));
    a.h0 = dst->op_params[1];
    a.beside = dst->op_params[2];
    return a;
}

// a node that launches nothing and writes nothing (as ggml-cuda's ggml_cuda_is_view_or_noop): the streams' region
// finder (ggml-fastgen-branches.h) and ggml-cuda's check of a region's writes (patch 0002) agree on it here
static inline bool ggml_fastgen_noop(const struct ggml_tensor * t) {
    return ggml_is_empty(t) || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_TRANSPOSE || t->op == GGML_OP_VIEW ||
           t->op == GGML_OP_PERMUTE || t->op == GGML_OP_NONE;
}

// Nodes of llama-fastgen's graphs that ggml-cuda treats its own way carry a mark in their last op_params slot (the
// marked ops' own parameters end at slot 4); the CPU and other backends ignore it:
//  FA:   a flash attention over one class of the cache (llama-graph-fastgen.cpp). ggml-cuda runs its decode step on
//        the MMA kernel, which reads each KV head once for its G query heads, where it would pick the vector kernel,
//        which reads each KV head once per query head and is bound by L2 at long context (patch 0002 in fattn.cu,
//        ggml_cuda_fastgen_fa_mma, which also holds the KV length it starts at);
//  ROWS: a class's K or V rows (set_rows into its cache); ggml-cuda writes a class's K and V rows in one launch
//        (ggml-fastgen-fuse.cu; the pair: ggml_fastgen_rows_pair in ggml-fastgen-branches.h);
//  JOIN: set by ggml-cuda's graph_optimize (ggml-fastgen-streams.cu) on a decode step's concat whose two parts, the
//        class's flash attention and the heavy-hitter op, are written in place into its buffer: no concat launches
//        (ggml_fastgen_join_in_place in ggml-fastgen-branches.h).
#define GGML_FASTGEN_MARK_SLOT (GGML_MAX_OP_PARAMS/4 - 1)
enum ggml_fastgen_mark {
    GGML_FASTGEN_MARK_FA   = 0x41464746, // "FGFA"
    GGML_FASTGEN_MARK_ROWS = 0x564b4746, // "FGKV"
    GGML_FASTGEN_MARK_JOIN = 0x4e4a4746, // "FGJN"
};

static inline void ggml_fastgen_mark(struct ggml_tensor * t, enum ggml_fastgen_mark m) {
    t->op_params[GGML_FASTGEN_MARK_SLOT] = (int32_t) m;
}

static inline bool ggml_fastgen_marked(const struct ggml_tensor * t, enum ggml_op op, enum ggml_fastgen_mark m) {
    return t->op == op && t->op_params[GGML_FASTGEN_MARK_SLOT] == (int32_t) m;
}

// a decode step (query rows per head up to GGML_FASTGEN_HH_MAX_ROWS): the decode paths run it (the CPU op's heads
// path, CUDA's hh_attn), and only such an op may run on a second CUDA stream (ggml-fastgen-branches.h)
static inline bool ggml_fastgen_hh_decode(const struct ggml_fastgen_hh_args * a) {
    return a->G*a->T <= GGML_FASTGEN_HH_MAX_ROWS;
}

// the op: the graph and the store's capability probe (llama-kv-cache-fastgen-hh.cpp) build it alike
static inline struct ggml_tensor * ggml_fastgen_hh_attn(struct ggml_context * ctx, struct ggml_tensor * q,
        struct ggml_tensor * k_cur, struct ggml_tensor * v_cur, struct ggml_tensor * idxs, struct ggml_tensor * K,
        struct ggml_tensor * V, struct ggml_tensor * S, struct ggml_tensor * P, struct ggml_tensor * query_pos,
        struct ggml_tensor * U, float scale, int32_t h0, int32_t beside) {
    const int64_t Dv = V->ne[1], n = K->ne[2], G = q->ne[1]/n, T = q->ne[2];
    struct ggml_tensor * res = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, Dv*G*n, T);
    struct ggml_tensor * srcs[] = { q, k_cur, v_cur, idxs, K, V, S, P, query_pos, U };
    res->op = GGML_OP_FASTGEN_HH_ATTN;
    memcpy(res->op_params, &scale, sizeof(float));
    res->op_params[1] = h0;
    res->op_params[2] = beside;
    for (int i = 0; i < (int) (sizeof(srcs)/sizeof(srcs[0])); ++i) {
        res->src[i] = srcs[i];
    }
    return res;
}

struct ggml_compute_params;

// CPU implementation (ggml-cpu), the reference of the CUDA kernel; any number of query rows
void ggml_compute_forward_fastgen_hh_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst);
// bytes of ggml-cpu's work buffer the CPU implementation needs (ggml_graph_plan)
size_t ggml_fastgen_hh_attn_work_size(const struct ggml_tensor * op, int n_tasks);

#ifdef __cplusplus
}
#endif
