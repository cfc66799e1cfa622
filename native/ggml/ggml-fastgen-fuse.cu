// llama-fastgen: two launches a decode layer that mixes a full class with heavy-hitter heads no longer makes on CUDA
// (hooks in patch 0002: ggml_cuda_try_fuse, ggml_cuda_compute_forward).
//
// At depth 0 on an H100 (session 30, ncu, the B = 0.30 mix) such a layer launched K rows, V rows, flash attention,
// its combine, the heavy-hitter op and a concat, where the full cache launches V rows, flash attention and its
// combine (llama.cpp writes K in its rope). With the op and the class attention on two streams (ggml-fastgen-streams.cu), two launches
// stay on the layer's path that the full cache does not make:
//  - the class's K rows: written here together with its V rows, in one launch (the nodes: ggml_fastgen_rows_pair);
//  - the concat: in a one-token step whose concat joins the two streams (ggml_fastgen_join_in_place, which marks it in
//    graph_optimize), the class's flash attention and the heavy-hitter op write their rows straight into its buffer,
//    and it launches nothing. The allocator keeps every tensor the region reads or writes alive until the join, so
//    that buffer overlaps none of them (not for a flash attention that converts K and V to F16 into scratch after
//    its output: graph_optimize marks no such join). Where the streams are not used this step (one stream, no CUDA graph, an eval
//    callback, events llama.cpp found invalid), each writes its own buffer and the concat runs, as before.
// LLAMA_FASTGEN_CUDA_FUSE=0 turns both off (to compare); llama.cpp's GGML_CUDA_DISABLE_FUSION=1 the first.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"
#include "ggml-fastgen-branches.h"

#include "fattn.cuh"

static bool fuse_on() {
    static const bool on = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_FUSE", 1, false, "on") != 0;
    return on;
}

// one set_rows of F32 rows into an F16 cache: row t of src goes to row idx[t] of dst
struct fastgen_rows {
    const char *    src;
    const int64_t * idx;
    half *          dst;
    int64_t         ne0, n;          // elements per row, rows
    int64_t         s_src, s_dst;    // row strides: bytes of src, elements of dst
};

// blockIdx.y: 0 the K rows, 1 the V rows; the values as llama.cpp's set_rows rounds them
static __global__ void fastgen_kv_rows(const fastgen_rows k, const fastgen_rows v) {
    const fastgen_rows & r = blockIdx.y == 0 ? k : v;
    const int64_t i = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= r.ne0*r.n) {
        return;
    }
    const int64_t t = i / r.ne0, e = i % r.ne0;
    ggml_cuda_pdl_sync();
    const int64_t row = r.idx[t];
    ggml_cuda_pdl_lc();
    r.dst[row*r.s_dst + e] = __float2half(((const float *) (r.src + t*r.s_src))[e]);
}

// a two-dimensional set_rows of F32 rows into F16 by I64 indices, to be computed
static bool rows_fit(const ggml_tensor * r) {
    const ggml_tensor * src = r->src[0], * idx = r->src[1];
    return (r->flags & GGML_TENSOR_FLAG_COMPUTE) && r->type == GGML_TYPE_F16 && src->type == GGML_TYPE_F32 &&
           idx->type == GGML_TYPE_I64 && r->ne[2] == 1 && r->ne[3] == 1 && src->ne[2] == 1 && src->ne[3] == 1 &&
           idx->ne[1] == 1 && r->nb[0] == sizeof(half) && src->nb[0] == sizeof(float) && idx->nb[0] == sizeof(int64_t);
}

int ggml_cuda_fastgen_try_fuse(ggml_backend_cuda_context & ctx, ggml_cgraph * g, int i) {
    const int m = fuse_on() ? ggml_fastgen_rows_pair(g, i) : -1;
    if (m < 0 || !rows_fit(g->nodes[i]) || !rows_fit(g->nodes[m])) {
        return 0;
    }
    auto rows = [](const ggml_tensor * r) {
        return fastgen_rows{ (const char *) r->src[0]->data, (const int64_t *) r->src[1]->data, (half *) r->data,
                             r->src[0]->ne[0], r->src[0]->ne[1], (int64_t) r->src[0]->nb[1], (int64_t) (r->nb[1]/sizeof(half)) };
    };
    const fastgen_rows k = rows(g->nodes[i]), v = rows(g->nodes[m]);
    const int64_t n = std::max(k.ne0*k.n, v.ne0*v.n);
    if (n > 0) {
        ggml_cuda_kernel_launch(fastgen_kv_rows, ggml_cuda_kernel_launch_params(dim3((n + 255)/256, 2), dim3(256), 0, ctx.stream()), k, v);
        CUDA_CHECK(cudaGetLastError());
    }
    return m - i; // the views between and the V rows: done
}

// A concat that graph_optimize marked JOIN (ggml-fastgen-streams.cu), with the fused launches on
static bool join_marked(const ggml_tensor * J) {
    return J && fuse_on() && ggml_fastgen_marked(J, GGML_OP_CONCAT, GGML_FASTGEN_MARK_JOIN);
}

// A marked concat left out this step: the join of one of this step's two-stream regions (else the streams are not used
// this step, and it runs)
static bool join_in_place(ggml_backend_cuda_context & ctx, const ggml_tensor * J) {
    if (!join_marked(J)) {
        return false;
    }
    for (const auto & fe : ctx.stream_context().concurrent_events) {
        if (fe.second.join_node == J) {
            return true;
        }
    }
    return false;
}

// Where node t (a marked flash attention or the heavy-hitter op) writes its rows: its part of the buffer of the concat
// that reads it, where that concat is left out this step; else nullptr (its own)
static char * join_slot(ggml_backend_cuda_context & ctx, const ggml_tensor * t) {
    for (const auto & fe : ctx.stream_context().concurrent_events) {
        const ggml_tensor * J = fe.second.join_node;
        if (!join_marked(J)) {
            continue;
        }
        for (int p = 0; p < 2; ++p) {
            const ggml_tensor * s = J->src[p];
            if (s == t || (s->op == GGML_OP_RESHAPE && s->src[0] == t)) {
                return (char *) J->data + (p == 0 ? 0 : ggml_nbytes(J->src[0]));
            }
        }
    }
    return nullptr;
}

float * ggml_cuda_fastgen_hh_out(ggml_backend_cuda_context & ctx, const ggml_tensor * dst) {
    char * slot = join_slot(ctx, dst);
    return (float *) (slot ? slot : dst->data);
}

bool ggml_cuda_fastgen_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    if (join_marked(dst)) {
        return join_in_place(ctx, dst); // its parts are in place: nothing to launch
    }
    if (!ggml_fastgen_marked(dst, GGML_OP_FLASH_ATTN_EXT, GGML_FASTGEN_MARK_FA)) {
        return false;
    }
    char * slot = join_slot(ctx, dst);
    if (!slot) {
        return false;
    }
    void * own = dst->data; // the tensor keeps its own buffer: the graph's checks compare it between steps
    dst->data = slot;
    ggml_cuda_flash_attn_ext(ctx, dst);
    dst->data = own;
    CUDA_CHECK(cudaGetLastError());
    return true;
}
