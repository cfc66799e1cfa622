// llama-fastgen: GGML_OP_FASTGEN_HH_ATTN on CUDA (see ggml-fastgen.h for the function).
//
// One kernel, flash-decoding style: a block per (head, chunk of HH_CHUNK cells). A block writes the
// new tokens that fall in its chunk (K, V, position: each cell belongs to one block, so nothing
// reads it before it is written), and if any query sees a cell of the chunk, computes the chunk's
// logits (four lanes per cell), their max and sum of exponentials per query row, and the
// unnormalized output (one thread per V row: V is stored transposed, so a thread's cells are
// contiguous). Chunks nobody sees (free cells, the empty end of a young cache) stop after reading
// their positions: decoding a short context costs what its occupied cells cost, not the capacity.
// The last block of a head to finish (a per-head counter) merges the chunks: it writes the output
// and adds each cell's probability, summed over the query rows, to the cell's score. Logits stay in
// a scratch buffer in between, so the probabilities added to the scores are those the output used.
// One launch per layer: at depth 0 a decode step is dominated by per-kernel latency, not bytes.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"

#define HH_CHUNK 64 // cells per block: 8 warps x 8 cells x 4 lanes
#define HH_WARPS 8

// DL = D / 32: a cell's 4 lanes hold DL x 8 K elements each; RB query rows per register block
template <int DL, int RB>
static __global__ void __launch_bounds__(HH_WARPS*WARP_SIZE) hh_attn(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const char * __restrict__ kc, const int64_t kc_nb1, const int64_t kc_nb2,
        const char * __restrict__ vc, const int64_t vc_nb1, const int64_t vc_nb2,
        const int64_t * __restrict__ idxs, const int64_t idxs_s1, const int h0,
        half * __restrict__ K, half * __restrict__ V, float * __restrict__ S, float * __restrict__ P,
        const float * __restrict__ qpos, float * __restrict__ dst,
        float * __restrict__ logits, float * __restrict__ part_m, float * __restrict__ part_l, float * __restrict__ part_o,
        const int Dv, const int C, const int T, const int G, const float scale) {
    constexpr int D = DL*WARP_SIZE;
    const int j = blockIdx.x, sp = blockIdx.y, ns = gridDim.y, c0 = sp*HH_CHUNK, n = gridDim.x;
    const int R = G*T, RP = (R + RB - 1)/RB*RB;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;

    extern __shared__ float smem[];
    __shared__ int64_t new_c[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ float   qp_s[GGML_FASTGEN_HH_MAX_ROWS], m_s[GGML_FASTGEN_HH_MAX_ROWS], inv_s[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ bool    last;

    if (threadIdx.x < T) {
        new_c[threadIdx.x] = idxs[(h0 + j)*idxs_s1 + threadIdx.x];
        qp_s[threadIdx.x]  = qpos[threadIdx.x];
    }
    __syncthreads();

    half  * Kj = K + (int64_t) j*C*D;
    half  * Vj = V + (int64_t) j*C*Dv;
    float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    unsigned int * done = (unsigned int *) (Pj + C); // the row's padding, zero between launches
    float * Sj = S + (int64_t) j*C;
    float * pm = part_m + ((int64_t) j*ns + sp)*R;
    float * pl = part_l + ((int64_t) j*ns + sp)*R;

    // this lane's cell: lane `sub` of 4 holds elements (i*4 + sub)*8 .. +8 (16-byte loads)
    const int cl = warp*(WARP_SIZE/4) + lane/4, sub = lane % 4, c = c0 + cl;
    float cp = c < C ? Pj[c] : INFINITY;
    int tn = -1;
    float qp_max = -INFINITY;
    for (int t = 0; t < T; ++t) {
        tn = new_c[t] == c ? t : tn;
        qp_max = fmaxf(qp_max, qp_s[t]);
    }
    if (!__syncthreads_or(tn >= 0 || qp_max - cp > 0.0f)) {
        for (int r = threadIdx.x; r < R; r += blockDim.x) {
            pm[r] = -INFINITY; // the merge skips this chunk
            pl[r] = 0.0f;
        }
    } else {
        float * q_s = smem;        // [R][D]
        float * w_s = smem + R*D;  // [RP][HH_CHUNK]: logits, then weights exp(l - m) (rows >= R: 0)
        for (int i = threadIdx.x; i < R*D; i += blockDim.x) {
            const int r = i / D, d = i % D, t = r / G, g = r % G;
            q_s[i] = ((const float *) (q + (int64_t) (j*G + g)*q_nb1 + t*q_nb2))[d];
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
        for (int i = threadIdx.x; i < (RP - R)*HH_CHUNK; i += blockDim.x) {
            w_s[R*HH_CHUNK + i] = 0.0f;
        }
        __syncthreads(); // q_s

        // 1. logits
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
            if (sub == 0) {
                w_s[r*HH_CHUNK + cl] = qp_s[r / G] - cp > 0.0f ? acc*scale : -INFINITY;
            }
        }
        __syncthreads();

        // 2. per query row: the chunk's max and sum of exponentials; logits kept for the merge
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
                if (c0 + i < C) {
                    logits[((int64_t) j*R + r)*C + c0 + i] = l;
                }
                w_s[r*HH_CHUNK + i] = w;
                s += w;
            }
            s = warp_reduce_sum(s);
            if (lane == 0) {
                pm[r] = m;
                pl[r] = s;
            }
        }
        __syncthreads();

        // 3. unnormalized output: one thread per V row, 8 contiguous cells per load
        const int nc = min(HH_CHUNK, C - c0); // a multiple of 8 (C is)
        for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
            const uint4 * vrow = (const uint4 *) (Vj + (int64_t) d*C + c0);
            for (int r0 = 0; r0 < R; r0 += RB) {
                float acc[RB] = { 0.0f };
                for (int i = 0; i < nc/8; ++i) {
                    const uint4 u = vrow[i];
                    const half2 * h = (const half2 *) &u;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 v = __half22float2(h[e]);
#pragma unroll
                        for (int rr = 0; rr < RB; ++rr) {
                            const float * w = w_s + (r0 + rr)*HH_CHUNK + 8*i + 2*e;
                            acc[rr] += w[0]*v.x + w[1]*v.y;
                        }
                    }
                }
#pragma unroll
                for (int rr = 0; rr < RB; ++rr) {
                    if (r0 + rr < R) {
                        part_o[(((int64_t) j*ns + sp)*R + r0 + rr)*Dv + d] = acc[rr];
                    }
                }
            }
        }
    }

    // the last block of head j to get here merges its chunks (threadFenceReduction pattern)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(done, 1u) == (unsigned int) ns - 1;
        if (last) {
            *done = 0; // ready for the next launch (stream order)
        }
    }
    __syncthreads();
    if (!last) {
        return;
    }
    __threadfence();

    // other blocks' results: read past L1 (__ldcg), which is not coherent between blocks
    float * f_s = smem; // [ns][R]: weight of each chunk's partial sums
    for (int r = warp; r < R; r += HH_WARPS) {
        float m = -INFINITY;
        for (int s = lane; s < ns; s += WARP_SIZE) {
            m = fmaxf(m, __ldcg(part_m + ((int64_t) j*ns + s)*R + r));
        }
        m = warp_reduce_max(m);
        float l = 0.0f;
        for (int s = lane; s < ns; s += WARP_SIZE) {
            const float ms = __ldcg(part_m + ((int64_t) j*ns + s)*R + r);
            const float f  = ms == -INFINITY ? 0.0f : expf(ms - m);
            f_s[s*R + r] = f;
            l += f*__ldcg(part_l + ((int64_t) j*ns + s)*R + r);
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
            const float f = f_s[s*R + r];
            if (f != 0.0f) { // chunks nobody saw wrote no partial output
                acc += f*__ldcg(part_o + (((int64_t) j*ns + s)*R + r)*Dv + d);
            }
        }
        dst[(int64_t) t*Dv*G*n + ((int64_t) j*G + g)*Dv + d] = acc*inv_s[r];
    }

    // scores of the cells of the chunks somebody saw; a free or reused cell starts again from 0
    for (int c1 = threadIdx.x; c1 < C; c1 += blockDim.x) {
        const int s = c1 / HH_CHUNK;
        bool seen = false;
        for (int r = 0; r < R; ++r) {
            seen = seen || f_s[s*R + r] != 0.0f;
        }
        if (!seen) {
            continue;
        }
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const float l = __ldcg(logits + ((int64_t) j*R + r)*C + c1);
            acc += l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
        }
        bool reset = isinf(__ldcg(Pj + c1));
        for (int t = 0; t < T; ++t) {
            reset = reset || new_c[t] == c1;
        }
        Sj[c1] = reset ? acc : Sj[c1] + acc;
    }
}

bool ggml_cuda_fastgen_hh_attn_supported(const ggml_tensor * op) {
    const ggml_tensor * q = op->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * K = op->src[GGML_FASTGEN_HH_K];
    const ggml_tensor * V = op->src[GGML_FASTGEN_HH_V];
    const int64_t n = K->ne[2];
    return K->type == GGML_TYPE_F16 && V->type == GGML_TYPE_F16 && ggml_is_contiguous(K) && ggml_is_contiguous(V) &&
           ggml_is_contiguous(op->src[GGML_FASTGEN_HH_S]) && ggml_is_contiguous(op->src[GGML_FASTGEN_HH_P]) &&
           op->src[GGML_FASTGEN_HH_P]->ne[0] == K->ne[1] + GGML_FASTGEN_HH_P_PAD &&
           op->op_params[1] >= 0 && op->op_params[1] + n <= op->src[GGML_FASTGEN_HH_IDXS]->ne[1] &&
           ggml_is_contiguous(op->src[GGML_FASTGEN_HH_QUERY_POS]) &&
           K->ne[0] % WARP_SIZE == 0 && K->ne[0] <= GGML_FASTGEN_HH_MAX_D &&
           K->ne[1] % 8 == 0 && K->ne[1] <= GGML_FASTGEN_HH_MAX_CELLS &&
           q->ne[1] % n == 0 && (q->ne[1]/n)*q->ne[2] <= GGML_FASTGEN_HH_MAX_ROWS &&
           q->nb[0] == sizeof(float) && op->src[GGML_FASTGEN_HH_K_CUR]->nb[0] == sizeof(float) &&
           op->src[GGML_FASTGEN_HH_V_CUR]->nb[0] == sizeof(float) && ggml_is_contiguous(op);
}

void ggml_cuda_fastgen_hh_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ggml_cuda_fastgen_hh_attn_supported(dst));
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    const ggml_tensor * q = a.q, * kc = a.k_cur, * vc = a.v_cur, * idxs = a.idxs, * qpos = a.query_pos;
    ggml_tensor * K = a.K, * V = a.V, * S = a.S, * P = a.P;
    const int h0 = a.h0;
    const int D = a.D, C = a.C, n = a.n, Dv = a.Dv, T = a.T, G = a.G, R = G*T;
    const int ns = (C + HH_CHUNK - 1)/HH_CHUNK, RB = R <= 4 ? 4 : 8, RP = (R + RB - 1)/RB*RB;
    const float scale = a.scale;

    ggml_cuda_pool_alloc<float> logits(ctx.pool(), (size_t) n*R*C);
    ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) n*ns*R);
    ggml_cuda_pool_alloc<float> part_o(ctx.pool(), (size_t) n*ns*R*Dv);

    const dim3 grid(n, ns), block(HH_WARPS*WARP_SIZE);
    const size_t smem = std::max<size_t>(R*D + RP*HH_CHUNK, (size_t) ns*R)*sizeof(float); // chunk, then merge
#define HH_LAUNCH(DL, RB_) hh_attn<DL, RB_><<<grid, block, smem, ctx.stream()>>>( \
        (const char *) q->data, q->nb[1], q->nb[2], (const char *) kc->data, kc->nb[1], kc->nb[2], \
        (const char *) vc->data, vc->nb[1], vc->nb[2], (const int64_t *) idxs->data, idxs->nb[1]/sizeof(int64_t), h0, \
        (half *) K->data, (half *) V->data, (float *) S->data, (float *) P->data, (const float *) qpos->data, \
        (float *) dst->data, \
        logits.get(), part_m.get(), part_l.get(), part_o.get(), Dv, C, T, G, scale)
#define HH_CASE(DL) case DL: if (RB == 4) { HH_LAUNCH(DL, 4); } else { HH_LAUNCH(DL, 8); } break
    switch (D / WARP_SIZE) {
        HH_CASE(1); HH_CASE(2); HH_CASE(3); HH_CASE(4); HH_CASE(5); HH_CASE(6); HH_CASE(7); HH_CASE(8);
        default: GGML_ABORT("fastgen: head size %d not supported", D);
    }
#undef HH_CASE
#undef HH_LAUNCH
    CUDA_CHECK(cudaGetLastError());
}
