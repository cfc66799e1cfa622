// llama-fastgen: GGML_OP_FASTGEN_HH_ATTN on CUDA (see ggml-fastgen.h for the function).
//
// Decoding touches up to a few thousand cells per head, so the work is split over the cells,
// flash-decoding style, to give every SM a block. Kernel 1, one block per (head, chunk of
// HH_CHUNK cells): writes the new tokens' K, V and positions (each cell belongs to exactly one
// block, so no other block reads it before it is written), computes the chunk's logits (four lanes
// per cell, no warp-wide reductions), its max and sum of exponentials per query row, and the
// unnormalized output (one thread per V row: V is stored transposed, so a thread's cells are
// contiguous). Chunks without a visible cell stop after their statistics. Kernel 2, one block per
// (head, chunk) again, merges the chunks' statistics, writes its share of the output and adds each
// of its cells' probability, summed over the query rows, to the cell's score. Logits stay in a scratch buffer between the two, so the probabilities added
// to the scores are the ones the output used.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"

#define HH_CHUNK 64 // cells per block of kernel 1: 8 warps x 8 cells x 4 lanes
#define HH_WARPS 8
#define HH_ROWS  8  // query rows accumulated in registers at a time

template <int DL> // D / 32: each of a cell's 4 lanes holds DL x 8 K elements
static __global__ void hh_attn_chunk(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const char * __restrict__ kc, const int64_t kc_nb1, const int64_t kc_nb2,
        const char * __restrict__ vc, const int64_t vc_nb1, const int64_t vc_nb2,
        const int64_t * __restrict__ idxs, const int64_t idxs_s1,
        half * __restrict__ K, half * __restrict__ V, float * __restrict__ P, const float * __restrict__ qpos,
        float * __restrict__ logits, float * __restrict__ part_m, float * __restrict__ part_l, float * __restrict__ part_o,
        const int Dv, const int C, const int T, const int G, const float scale) {
    constexpr int D = DL*WARP_SIZE;
    const int j = blockIdx.x, sp = blockIdx.y, ns = gridDim.y, c0 = sp*HH_CHUNK;
    const int R = G*T, RP = (R + HH_ROWS - 1)/HH_ROWS*HH_ROWS;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;

    extern __shared__ float smem[];
    float * q_s = smem;        // [R][D]
    float * w_s = smem + R*D;  // [RP][HH_CHUNK]: logits, then weights exp(l - m) (rows >= R: 0)
    __shared__ int64_t new_c[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ float   qp_s[GGML_FASTGEN_HH_MAX_ROWS];

    for (int i = threadIdx.x; i < R*D; i += blockDim.x) {
        const int r = i / D, d = i % D, t = r / G, g = r % G;
        q_s[i] = ((const float *) (q + (int64_t) (j*G + g)*q_nb1 + t*q_nb2))[d];
    }
    if (threadIdx.x < T) {
        new_c[threadIdx.x] = idxs[j*idxs_s1 + threadIdx.x];
        qp_s[threadIdx.x]  = qpos[threadIdx.x];
    }
    __syncthreads();

    half  * Kj = K + (int64_t) j*C*D;
    half  * Vj = V + (int64_t) j*C*Dv;
    float * Pj = P + (int64_t) j*C;

    // 1. logits: 4 lanes per cell, lane `sub` holds elements (i*4 + sub)*8 .. +8 (16-byte loads)
    const int cl = warp*(WARP_SIZE/4) + lane/4, sub = lane % 4, c = c0 + cl;
    float cp = c < C ? Pj[c] : INFINITY;
    int tn = -1;
    for (int t = 0; t < T; ++t) {
        tn = new_c[t] == c ? t : tn;
    }
    float k[DL*8];
    if (tn >= 0) { // a new token: into the store first (rounded as stored), then attended
        const float * kr = (const float *) (kc + j*kc_nb1 + tn*kc_nb2);
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            __align__(16) half h[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                h[e] = __float2half(kr[(i*4 + sub)*8 + e]);
                k[i*8 + e] = __half2float(h[e]);
            }
            *(uint4 *) (Kj + (int64_t) c*D + (i*4 + sub)*8) = *(const uint4 *) h;
        }
        const float * vr = (const float *) (vc + j*vc_nb1 + tn*vc_nb2);
        for (int d = sub; d < Dv; d += 4) {
            Vj[c + (int64_t) d*C] = __float2half(vr[d]);
        }
        cp = qp_s[tn] - 0.5f;
        if (sub == 0) {
            Pj[c] = cp;
        }
    } else {
        float qp_max = -INFINITY;
        for (int t = 0; t < T; ++t) {
            qp_max = fmaxf(qp_max, qp_s[t]);
        }
        const bool any = qp_max - cp > 0.0f; // occupied and before some query
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            uint4 u = make_uint4(0, 0, 0, 0);
            if (any) {
                u = *(const uint4 *) (Kj + (int64_t) c*D + (i*4 + sub)*8);
            }
            const half * h = (const half *) &u;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                k[i*8 + e] = __half2float(h[e]);
            }
        }
    }
    bool visible = false;
    for (int r = 0; r < R; ++r) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                acc += q_s[r*D + (i*4 + sub)*8 + e]*k[i*8 + e];
            }
        }
        acc += __shfl_xor_sync(0xffffffff, acc, 1);
        acc += __shfl_xor_sync(0xffffffff, acc, 2);
        const bool vis = qp_s[r / G] - cp > 0.0f;
        visible = visible || vis;
        if (sub == 0) {
            w_s[r*HH_CHUNK + cl] = vis ? acc*scale : -INFINITY;
        }
    }
    for (int i = threadIdx.x; i < (RP - R)*HH_CHUNK; i += blockDim.x) {
        w_s[R*HH_CHUNK + i] = 0.0f;
    }
    const bool chunk_visible = __syncthreads_or(visible);

    // 2. per query row: the chunk's max and sum of exponentials; logits kept for kernel 2 (which
    // reads no logits of a chunk that saw nothing: its max is -inf)
    for (int r = warp; r < R; r += HH_WARPS) {
        float m = -INFINITY;
        for (int i = lane; i < HH_CHUNK; i += WARP_SIZE) {
            m = fmaxf(m, w_s[r*HH_CHUNK + i]);
        }
        m = warp_reduce_max(m);
        float s = 0.0f;
        for (int i = lane; i < HH_CHUNK; i += WARP_SIZE) {
            const float l = w_s[r*HH_CHUNK + i];
            const float w = l == -INFINITY ? 0.0f : expf(l - m);
            if (chunk_visible && c0 + i < C) {
                logits[((int64_t) j*R + r)*C + c0 + i] = l;
            }
            w_s[r*HH_CHUNK + i] = w;
            s += w;
        }
        s = warp_reduce_sum(s);
        if (lane == 0) {
            part_m[((int64_t) j*ns + sp)*R + r] = m;
            part_l[((int64_t) j*ns + sp)*R + r] = s;
        }
    }
    if (!chunk_visible) {
        return; // kernel 2 skips this chunk's part_o (its weight is 0)
    }
    __syncthreads();

    // 3. unnormalized output: one thread per V row, over the chunk's contiguous cells
    const int nc = min(HH_CHUNK, C - c0);
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        const half2 * vrow = (const half2 *) (Vj + (int64_t) d*C + c0);
        for (int r0 = 0; r0 < R; r0 += HH_ROWS) {
            float acc[HH_ROWS] = { 0.0f };
            for (int i = 0; i < nc/2; ++i) {
                const float2 v = __half22float2(vrow[i]);
#pragma unroll
                for (int rr = 0; rr < HH_ROWS; ++rr) {
                    acc[rr] += w_s[(r0 + rr)*HH_CHUNK + 2*i]*v.x + w_s[(r0 + rr)*HH_CHUNK + 2*i + 1]*v.y;
                }
            }
#pragma unroll
            for (int rr = 0; rr < HH_ROWS; ++rr) {
                if (r0 + rr < R) {
                    part_o[(((int64_t) j*ns + sp)*R + r0 + rr)*Dv + d] = acc[rr];
                }
            }
        }
    }
}

// one block per (head, chunk): every block merges the chunk statistics (ns x R values), then writes
// its share of the outputs and the scores of its chunk's cells
static __global__ void hh_attn_merge(
        const float * __restrict__ logits, const float * __restrict__ part_m, const float * __restrict__ part_l,
        const float * __restrict__ part_o, float * __restrict__ dst, float * __restrict__ S,
        const float * __restrict__ P, const int64_t * __restrict__ idxs, const int64_t idxs_s1,
        const int Dv, const int C, const int T, const int G) {
    const int j = blockIdx.x, sp = blockIdx.y, ns = gridDim.y, R = G*T, n = gridDim.x;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    extern __shared__ float f_s[]; // [ns][R]: weight of each chunk's partial sums
    __shared__ float m_s[GGML_FASTGEN_HH_MAX_ROWS], inv_s[GGML_FASTGEN_HH_MAX_ROWS];

    for (int r = warp; r < R; r += HH_WARPS) {
        float m = -INFINITY;
        for (int s = lane; s < ns; s += WARP_SIZE) {
            m = fmaxf(m, part_m[((int64_t) j*ns + s)*R + r]);
        }
        m = warp_reduce_max(m);
        float l = 0.0f;
        for (int s = lane; s < ns; s += WARP_SIZE) {
            const float ms = part_m[((int64_t) j*ns + s)*R + r];
            const float f  = ms == -INFINITY ? 0.0f : expf(ms - m);
            f_s[s*R + r] = f;
            l += f*part_l[((int64_t) j*ns + s)*R + r];
        }
        l = warp_reduce_sum(l);
        if (lane == 0) {
            m_s[r]   = m;
            inv_s[r] = l > 0.0f ? 1.0f/l : 0.0f;
        }
    }
    __syncthreads();

    const int per = (R*Dv + ns - 1)/ns;
    for (int i = sp*per + threadIdx.x; i < min(R*Dv, (sp + 1)*per); i += blockDim.x) {
        const int r = i / Dv, d = i % Dv, t = r / G, g = r % G;
        float acc = 0.0f;
        for (int s = 0; s < ns; ++s) {
            const float f = f_s[s*R + r];
            if (f != 0.0f) { // chunks that saw nothing wrote no partial output
                acc += f*part_o[(((int64_t) j*ns + s)*R + r)*Dv + d];
            }
        }
        dst[(int64_t) t*Dv*G*n + ((int64_t) j*G + g)*Dv + d] = acc*inv_s[r];
    }

    bool seen = false;
    for (int r = 0; r < R; ++r) {
        seen = seen || f_s[sp*R + r] != 0.0f;
    }
    for (int c = sp*HH_CHUNK + threadIdx.x; c < min(C, (sp + 1)*HH_CHUNK); c += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < R && seen; ++r) {
            const float l = logits[((int64_t) j*R + r)*C + c];
            acc += l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
        }
        bool reset = isinf(P[(int64_t) j*C + c]); // free
        for (int t = 0; t < T; ++t) {
            reset = reset || idxs[j*idxs_s1 + t] == c; // reused by a new token
        }
        S[(int64_t) j*C + c] = reset ? acc : S[(int64_t) j*C + c] + acc;
    }
}

bool ggml_cuda_fastgen_hh_attn_supported(const ggml_tensor * op) {
    const ggml_tensor * q = op->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * K = op->src[GGML_FASTGEN_HH_K];
    const ggml_tensor * V = op->src[GGML_FASTGEN_HH_V];
    const int64_t n = K->ne[2];
    return K->type == GGML_TYPE_F16 && V->type == GGML_TYPE_F16 && ggml_is_contiguous(K) && ggml_is_contiguous(V) &&
           ggml_is_contiguous(op->src[GGML_FASTGEN_HH_S]) && ggml_is_contiguous(op->src[GGML_FASTGEN_HH_P]) &&
           K->ne[0] % WARP_SIZE == 0 && K->ne[0] <= GGML_FASTGEN_HH_MAX_D &&
           K->ne[1] % 8 == 0 && K->ne[1] <= GGML_FASTGEN_HH_MAX_CELLS &&
           q->ne[1] % n == 0 && (q->ne[1]/n)*q->ne[2] <= GGML_FASTGEN_HH_MAX_ROWS &&
           q->nb[0] == sizeof(float) && op->src[GGML_FASTGEN_HH_K_CUR]->nb[0] == sizeof(float) &&
           op->src[GGML_FASTGEN_HH_V_CUR]->nb[0] == sizeof(float) && ggml_is_contiguous(op);
}

void ggml_cuda_fastgen_hh_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * kc   = dst->src[GGML_FASTGEN_HH_K_CUR];
    const ggml_tensor * vc   = dst->src[GGML_FASTGEN_HH_V_CUR];
    const ggml_tensor * idxs = dst->src[GGML_FASTGEN_HH_IDXS];
    ggml_tensor       * K    = dst->src[GGML_FASTGEN_HH_K];
    ggml_tensor       * V    = dst->src[GGML_FASTGEN_HH_V];
    ggml_tensor       * S    = dst->src[GGML_FASTGEN_HH_S];
    ggml_tensor       * P    = dst->src[GGML_FASTGEN_HH_P];
    const ggml_tensor * qpos = dst->src[GGML_FASTGEN_HH_QUERY_POS];
    GGML_ASSERT(ggml_cuda_fastgen_hh_attn_supported(dst));

    const int D = K->ne[0], C = K->ne[1], n = K->ne[2], Dv = V->ne[1], T = q->ne[2], G = q->ne[1]/n, R = G*T;
    const int ns = (C + HH_CHUNK - 1)/HH_CHUNK, RP = (R + HH_ROWS - 1)/HH_ROWS*HH_ROWS;
    float scale;
    memcpy(&scale, dst->op_params, sizeof(float));

    ggml_cuda_pool_alloc<float> logits(ctx.pool(), (size_t) n*R*C);
    ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_o(ctx.pool(), (size_t) n*ns*R*Dv);
    cudaStream_t stream = ctx.stream();

    const dim3 grid1(n, ns), block(HH_WARPS*WARP_SIZE);
    const size_t smem1 = (size_t) (R*D + RP*HH_CHUNK)*sizeof(float);
#define HH_LAUNCH(DL) hh_attn_chunk<DL><<<grid1, block, smem1, stream>>>( \
        (const char *) q->data, q->nb[1], q->nb[2], (const char *) kc->data, kc->nb[1], kc->nb[2], \
        (const char *) vc->data, vc->nb[1], vc->nb[2], (const int64_t *) idxs->data, idxs->nb[1]/sizeof(int64_t), \
        (half *) K->data, (half *) V->data, (float *) P->data, (const float *) qpos->data, \
        logits.get(), part_m.get(), part_l.get(), part_o.get(), Dv, C, T, G, scale)
    switch (D / WARP_SIZE) {
        case 1: HH_LAUNCH(1); break;
        case 2: HH_LAUNCH(2); break;
        case 3: HH_LAUNCH(3); break;
        case 4: HH_LAUNCH(4); break;
        case 5: HH_LAUNCH(5); break;
        case 6: HH_LAUNCH(6); break;
        case 7: HH_LAUNCH(7); break;
        case 8: HH_LAUNCH(8); break;
        default: GGML_ABORT("fastgen: head size %d not supported", D);
    }
#undef HH_LAUNCH
    CUDA_CHECK(cudaGetLastError());

    hh_attn_merge<<<grid1, block, (size_t) ns*R*sizeof(float), stream>>>(
        logits.get(), part_m.get(), part_l.get(), part_o.get(), (float *) dst->data, (float *) S->data,
        (const float *) P->data, (const int64_t *) idxs->data, idxs->nb[1]/sizeof(int64_t), Dv, C, T, G);
    CUDA_CHECK(cudaGetLastError());
}
