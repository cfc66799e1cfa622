// llama-fastgen: GGML_OP_FASTGEN_HH_ATTN on CUDA (see ggml-fastgen.h for the function).
//
// Decoding touches a few hundred cells per head, so the work is split over the cells, flash-decoding
// style, to give every SM a block: kernel 1, one block per (head, chunk of HH_CHUNK cells), writes the
// new tokens' K/V (each cell belongs to exactly one block, so no other block reads it before it is
// written), computes the chunk's logits, its max, sum of exponentials and unnormalized output;
// kernel 2, one block per head, merges the chunks, writes the output and adds each cell's
// probability, summed over the query rows, to its score. Logits are kept in a scratch buffer
// between the two so the probabilities are exact, not re-derived.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"

#define HH_CHUNK 64 // cells per block of kernel 1
#define HH_WARPS 8

template <int DL> // D / 32: K elements per lane
static __global__ void hh_attn_chunk(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const char * __restrict__ kc, const int64_t kc_nb1, const int64_t kc_nb2,
        const char * __restrict__ vc, const int64_t vc_nb1, const int64_t vc_nb2,
        const int64_t * __restrict__ idxs, const int64_t idxs_s1,
        half * __restrict__ K, half * __restrict__ V,
        const float * __restrict__ cpos, const int64_t cpos_s1, const float * __restrict__ qpos,
        float * __restrict__ logits, float * __restrict__ part_m, float * __restrict__ part_l, float * __restrict__ part_o,
        const int Dv, const int C, const int T, const int G, const float scale) {
    constexpr int D = DL*WARP_SIZE;
    const int j = blockIdx.x, sp = blockIdx.y, ns = gridDim.y, c0 = sp*HH_CHUNK;
    const int R = G*T, lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;

    extern __shared__ float smem[];
    float * q_s = smem;       // [R][D]
    float * l_s = smem + R*D; // [R][HH_CHUNK]: logits, then weights exp(l - m)
    __shared__ int64_t new_c[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ float   qp_s[GGML_FASTGEN_HH_MAX_ROWS];

    for (int i = threadIdx.x; i < R*D; i += blockDim.x) {
        const int r = i / D, d = i % D, t = r / G, g = r % G;
        q_s[i] = ((const float *) (q + (int64_t) (j*G + g)*q_nb1 + t*q_nb2))[d];
    }
    float qp_max = -INFINITY;
    for (int t = 0; t < T; ++t) {
        qp_max = fmaxf(qp_max, qpos[t]);
    }
    if (threadIdx.x < T) {
        new_c[threadIdx.x] = idxs[j*idxs_s1 + threadIdx.x];
        qp_s[threadIdx.x]  = qpos[threadIdx.x];
    }
    __syncthreads();

    half * Kj = K + (int64_t) j*C*D;
    half * Vj = V + (int64_t) j*C*Dv;

    // 1. logits of the chunk's cells, one warp per cell; new tokens are written here first
    for (int cl = warp; cl < HH_CHUNK; cl += HH_WARPS) {
        const int c = c0 + cl;
        const float cp = c < C ? cpos[j*cpos_s1 + c] : INFINITY;
        int tn = -1;
        for (int t = 0; t < T; ++t) {
            tn = new_c[t] == c ? t : tn;
        }
        float k[DL];
        if (tn >= 0) {
            const float * kr = (const float *) (kc + j*kc_nb1 + tn*kc_nb2);
            const float * vr = (const float *) (vc + j*vc_nb1 + tn*vc_nb2);
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                const half h = __float2half(kr[lane + i*WARP_SIZE]);
                Kj[(int64_t) c*D + lane + i*WARP_SIZE] = h;
                k[i] = __half2float(h);
            }
            for (int d = lane; d < Dv; d += WARP_SIZE) {
                Vj[c + (int64_t) d*C] = __float2half(vr[d]);
            }
        } else if (qp_max - cp > 0.0f) {
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                k[i] = __half2float(Kj[(int64_t) c*D + lane + i*WARP_SIZE]);
            }
        } else { // free, past the chunk's end, or after every query
            for (int r = lane; r < R; r += WARP_SIZE) {
                l_s[r*HH_CHUNK + cl] = -INFINITY;
            }
            continue;
        }
        for (int r = 0; r < R; ++r) {
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                acc += q_s[r*D + lane + i*WARP_SIZE]*k[i];
            }
            acc = warp_reduce_sum(acc);
            if (lane == 0) {
                l_s[r*HH_CHUNK + cl] = qp_s[r / G] - cp > 0.0f ? acc*scale : -INFINITY;
            }
        }
    }
    __syncthreads();

    // 2. per query row: the chunk's max and sum of exponentials; logits kept for kernel 2
    for (int r = warp; r < R; r += HH_WARPS) {
        float m = -INFINITY;
        for (int cl = lane; cl < HH_CHUNK; cl += WARP_SIZE) {
            m = fmaxf(m, l_s[r*HH_CHUNK + cl]);
        }
        m = warp_reduce_max(m);
        float s = 0.0f;
        for (int cl = lane; cl < HH_CHUNK; cl += WARP_SIZE) {
            const float l = l_s[r*HH_CHUNK + cl];
            const float w = l == -INFINITY ? 0.0f : expf(l - m);
            if (c0 + cl < C) {
                logits[((int64_t) j*R + r)*C + c0 + cl] = l;
            }
            l_s[r*HH_CHUNK + cl] = w;
            s += w;
        }
        s = warp_reduce_sum(s);
        if (lane == 0) {
            part_m[((int64_t) j*ns + sp)*R + r] = m;
            part_l[((int64_t) j*ns + sp)*R + r] = s;
        }
    }
    __syncthreads();

    // 3. unnormalized output of the chunk: one warp per V row (V is transposed: cells are contiguous)
    constexpr int CL = HH_CHUNK / WARP_SIZE;
    for (int d = warp; d < Dv; d += HH_WARPS) {
        float v[CL];
#pragma unroll
        for (int i = 0; i < CL; ++i) {
            const int c = c0 + lane + i*WARP_SIZE;
            v[i] = c < C ? __half2float(Vj[c + (int64_t) d*C]) : 0.0f;
        }
        for (int r = 0; r < R; ++r) {
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < CL; ++i) {
                acc += l_s[r*HH_CHUNK + lane + i*WARP_SIZE]*v[i];
            }
            acc = warp_reduce_sum(acc);
            if (lane == 0) {
                part_o[(((int64_t) j*ns + sp)*R + r)*Dv + d] = acc;
            }
        }
    }
}

static __global__ void hh_attn_merge(
        const float * __restrict__ logits, const float * __restrict__ part_m, const float * __restrict__ part_l,
        const float * __restrict__ part_o, float * __restrict__ dst, float * __restrict__ S, const int64_t S_s1,
        const float * __restrict__ keep, const int64_t keep_s1,
        const int Dv, const int C, const int T, const int G, const int ns) {
    const int j = blockIdx.x, R = G*T, n = gridDim.x;
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

    for (int i = threadIdx.x; i < R*Dv; i += blockDim.x) {
        const int r = i / Dv, d = i % Dv, t = r / G, g = r % G;
        float acc = 0.0f;
        for (int s = 0; s < ns; ++s) {
            acc += f_s[s*R + r]*part_o[(((int64_t) j*ns + s)*R + r)*Dv + d];
        }
        dst[(int64_t) t*Dv*G*n + ((int64_t) j*G + g)*Dv + d] = acc*inv_s[r];
    }

    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const float l = logits[((int64_t) j*R + r)*C + c];
            acc += l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
        }
        S[j*S_s1 + c] = S[j*S_s1 + c]*keep[j*keep_s1 + c] + acc;
    }
}

bool ggml_cuda_fastgen_hh_attn_supported(const ggml_tensor * op) {
    const ggml_tensor * q = op->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * K = op->src[GGML_FASTGEN_HH_K];
    const ggml_tensor * V = op->src[GGML_FASTGEN_HH_V];
    const int64_t n = K->ne[2];
    return K->type == GGML_TYPE_F16 && V->type == GGML_TYPE_F16 && ggml_is_contiguous(K) && ggml_is_contiguous(V) &&
           K->ne[0] % WARP_SIZE == 0 && K->ne[0] <= GGML_FASTGEN_HH_MAX_D && K->ne[1] <= GGML_FASTGEN_HH_MAX_CELLS &&
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
    const ggml_tensor * keep = dst->src[GGML_FASTGEN_HH_KEEP];
    const ggml_tensor * cpos = dst->src[GGML_FASTGEN_HH_CELL_POS];
    const ggml_tensor * qpos = dst->src[GGML_FASTGEN_HH_QUERY_POS];
    GGML_ASSERT(ggml_cuda_fastgen_hh_attn_supported(dst));

    const int D = K->ne[0], C = K->ne[1], n = K->ne[2], Dv = V->ne[1], T = q->ne[2], G = q->ne[1]/n, R = G*T;
    const int ns = (C + HH_CHUNK - 1)/HH_CHUNK;
    float scale;
    memcpy(&scale, dst->op_params, sizeof(float));

    ggml_cuda_pool_alloc<float> logits(ctx.pool(), (size_t) n*R*C);
    ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_o(ctx.pool(), (size_t) n*ns*R*Dv);
    cudaStream_t stream = ctx.stream();

    const dim3 grid1(n, ns), block(HH_WARPS*WARP_SIZE);
    const size_t smem1 = (size_t) R*(D + HH_CHUNK)*sizeof(float);
#define HH_LAUNCH(DL) hh_attn_chunk<DL><<<grid1, block, smem1, stream>>>( \
        (const char *) q->data, q->nb[1], q->nb[2], (const char *) kc->data, kc->nb[1], kc->nb[2], \
        (const char *) vc->data, vc->nb[1], vc->nb[2], (const int64_t *) idxs->data, idxs->nb[1]/sizeof(int64_t), \
        (half *) K->data, (half *) V->data, (const float *) cpos->data, cpos->nb[1]/sizeof(float), (const float *) qpos->data, \
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

    hh_attn_merge<<<n, block, (size_t) ns*R*sizeof(float), stream>>>(
        logits.get(), part_m.get(), part_l.get(), part_o.get(), (float *) dst->data,
        (float *) S->data, S->nb[1]/sizeof(float), (const float *) keep->data, keep->nb[1]/sizeof(float),
        Dv, C, T, G, ns);
    CUDA_CHECK(cudaGetLastError());
}
