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
//
// Prefill (more query rows than GGML_FASTGEN_HH_MAX_ROWS) takes four launches on tensor cores (WMMA:
// f16 in, f32 accumulate), the CPU op's function in another order:
//  1. hh_pf_write: the ubatch's K, V and positions into its cells, their scores to 0; the store then
//     holds what the CPU op calls "cell positions as they will be after this ubatch";
//  2. hh_pf_stats: a block per (64 query rows, head, split) walks its share of the head's cells in
//     tiles of 64: each row's max logit and sum of exponentials (no output);
//  3. hh_pf_out: the same blocks merge the splits' statistics and compute the same logits again (same
//     f16 operands, same code: the same values), now as final probabilities: summed over the block's
//     rows per cell (the column sums flash attention never forms) and multiplied by V into output
//     accumulators that stay in registers (final probabilities need no rescaling);
//  4. hh_pf_scores adds the row tiles' column sums into the scores (hh_pf_merge first adds up the
//     output of the splits when there are several).
// Both passes skip the tiles no query of the block sees (free cells, the ubatch's later tokens).
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"

#if !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
#include <mma.h>
#endif

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
    __shared__ __align__(8) unsigned char free_s[HH_CHUNK]; // cells of the chunk that hold no token

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
        if (sub == 0) {
            free_s[cl] = isinf(cp); // past C too
        }
        for (int i = threadIdx.x; i < (RP - R)*HH_CHUNK; i += blockDim.x) {
            w_s[R*HH_CHUNK + i] = 0.0f;
        }
        __syncthreads(); // q_s, free_s

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
                    uint4 u = vrow[i];
                    const uint2 fr = *(const uint2 *) (free_s + 8*i);
                    if (fr.x | fr.y) { // a free cell's V may be anything (0 x NaN is NaN): as the CPU op, 0
                        half * hv = (half *) &u;
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            hv[e] = free_s[8*i + e] ? __float2half(0.0f) : hv[e];
                        }
                    }
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

#define HH_PF_TILE  64 // query rows, and cells, per tile
#define HH_PF_WARPS 4  // 16 query rows of a tile each

// shared-memory row strides (elements): padded so WMMA pointers stay 32-byte aligned and rows spread over banks
static __host__ __device__ constexpr int hh_pf_dp(int D) { return D + 8; }            // q, k (f16)
static __host__ __device__ constexpr int hh_pf_vp()      { return HH_PF_TILE + 8; }   // v transposed, p (f16)
static __host__ __device__ constexpr int hh_pf_sp()      { return HH_PF_TILE + 4; }   // logits, probabilities (f32)
static size_t hh_pf_stats_smem(int D) {
    return 2*sizeof(half)*HH_PF_TILE*hh_pf_dp(D) + sizeof(float)*HH_PF_TILE*hh_pf_sp();
}
static size_t hh_pf_out_smem(int D, int Dv) {
    const size_t tiles = hh_pf_stats_smem(D) + sizeof(half)*Dv*hh_pf_vp(); // p (f16) reuses k's space
    const size_t staging = sizeof(float)*HH_PF_TILE*(Dv + 4); // the output rows, once the tiles are done
    return std::max(tiles, staging);
}
// the kernels' static shared memory (row statistics, cell positions, flags), rounded up
#define HH_PF_STATIC_SMEM 2048
// output columns / 16 the output kernel is built for (head sizes 64 ... 256): its accumulators stay in registers
#define HH_PF_NB_CASES(X) X(4) X(5) X(6) X(7) X(8) X(12) X(16)

static __global__ void hh_pf_write(
        const char * __restrict__ kc, const int64_t kc_nb1, const int64_t kc_nb2,
        const char * __restrict__ vc, const int64_t vc_nb1, const int64_t vc_nb2,
        const int64_t * __restrict__ idxs, const int64_t idxs_s1, const int h0,
        half * __restrict__ K, half * __restrict__ V, float * __restrict__ S, float * __restrict__ P,
        const float * __restrict__ qpos, const int D, const int Dv, const int C) {
    const int t = blockIdx.x, j = blockIdx.y;
    const int64_t c = idxs[(h0 + j)*idxs_s1 + t];
    const float * kr = (const float *) (kc + j*kc_nb1 + t*kc_nb2);
    const float * vr = (const float *) (vc + j*vc_nb1 + t*vc_nb2);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        K[((int64_t) j*C + c)*D + d] = __float2half(kr[d]);
    }
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        V[(int64_t) j*C*Dv + (int64_t) d*C + c] = __float2half(vr[d]);
    }
    if (threadIdx.x == 0) {
        P[(int64_t) j*(C + GGML_FASTGEN_HH_P_PAD) + c] = qpos[t] - 0.5f;
        S[(int64_t) j*C + c] = 0.0f; // a new or reused cell starts from this ubatch's attention
    }
}

#if defined(TURING_MMA_AVAILABLE)
namespace wmma = nvcuda::wmma;

// the block's query rows (r = t*G + g) as f16 into q_s (rows past R: zero), their positions into qp_r
// (-inf past R); returns the largest position
static __device__ float hh_pf_load_q(half * q_s, float * qp_r, const char * q, int64_t q_nb1, int64_t q_nb2,
        const float * qpos, int j, int r0, int R, int G, int D) {
    __shared__ float qmax_s;
    for (int i = threadIdx.x; i < HH_PF_TILE*D; i += blockDim.x) {
        const int rr = i / D, d = i % D, r = r0 + rr;
        const float x = r < R ? ((const float *) (q + (int64_t) (j*G + r % G)*q_nb1 + (int64_t) (r / G)*q_nb2))[d] : 0.0f;
        q_s[rr*hh_pf_dp(D) + d] = __float2half(x);
    }
    if (threadIdx.x < HH_PF_TILE) {
        const int r = r0 + threadIdx.x;
        qp_r[threadIdx.x] = r < R ? qpos[r / G] : -INFINITY;
    }
    __syncthreads();
    if (threadIdx.x < WARP_SIZE) {
        const float m = warp_reduce_max(fmaxf(qp_r[threadIdx.x], qp_r[threadIdx.x + WARP_SIZE]));
        if (threadIdx.x == 0) {
            qmax_s = m;
        }
    }
    __syncthreads();
    return qmax_s;
}

// cells [c0, c0 + 64) of a head: their positions into pc (+inf past C); false when no query row of the
// block sees one of them (free cells, the ubatch's later tokens). Ends in a barrier.
static __device__ bool hh_pf_tile_seen(float * pc, const float * Pj, int c0, int C, float qmax) {
    float pv = INFINITY;
    if (threadIdx.x < HH_PF_TILE) {
        pv = c0 + (int) threadIdx.x < C ? Pj[c0 + threadIdx.x] : INFINITY;
        pc[threadIdx.x] = pv;
    }
    return __syncthreads_or(qmax - pv > 0.0f);
}

// K rows of the tile's cells into k_s (zeros past C); C % 8 == 0, so 8 cells are all in or all out
static __device__ void hh_pf_load_k(half * k_s, const half * Kj, int c0, int C, int D) {
    const int per = D/8;
    for (int i = threadIdx.x; i < HH_PF_TILE*per; i += blockDim.x) {
        const int c = i / per, e = i % per;
        uint4 u = make_uint4(0, 0, 0, 0);
        if (c0 + c < C) {
            u = *(const uint4 *) (Kj + (int64_t) (c0 + c)*D + 8*e);
        }
        *(uint4 *) (k_s + c*hh_pf_dp(D) + 8*e) = u;
    }
}

// logits (scaled) of the warp's 16 query rows x the tile's 64 cells into s_s (f32). Both kernels call
// this with the same operands, so the statistics and the probabilities see the same logits.
static __device__ void hh_pf_logits(const half * q_s, const half * k_s, float * s_s, int D, int warp, float scale) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[HH_PF_TILE/16];
#pragma unroll
    for (int b = 0; b < HH_PF_TILE/16; ++b) {
        wmma::fill_fragment(acc[b], 0.0f);
    }
    for (int k = 0; k < D; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
        wmma::load_matrix_sync(a, q_s + 16*warp*hh_pf_dp(D) + k, hh_pf_dp(D));
#pragma unroll
        for (int b = 0; b < HH_PF_TILE/16; ++b) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> kb; // K^T: cell b's rows, column-major
            wmma::load_matrix_sync(kb, k_s + 16*b*hh_pf_dp(D) + k, hh_pf_dp(D));
            wmma::mma_sync(acc[b], a, kb, acc[b]);
        }
    }
#pragma unroll
    for (int b = 0; b < HH_PF_TILE/16; ++b) {
#pragma unroll
        for (int e = 0; e < acc[b].num_elements; ++e) {
            acc[b].x[e] = __fmul_rn(acc[b].x[e], scale); // never contracted into another operation
        }
        wmma::store_matrix_sync(s_s + 16*warp*hh_pf_sp() + 16*b, acc[b], hh_pf_sp(), wmma::mem_row_major);
    }
}
#endif // defined(TURING_MMA_AVAILABLE)

// Pass 1, block (row tile, head j, split z): the max logit and sum of exponentials of each query row
// over the cell tiles z, z + ns, ... (part_m, part_l [ns][n][RP]); the output pass merges the splits.
static __global__ void __launch_bounds__(HH_PF_WARPS*WARP_SIZE) hh_pf_stats(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const half * __restrict__ K, const float * __restrict__ P, const float * __restrict__ qpos,
        float * __restrict__ part_m, float * __restrict__ part_l,
        const int D, const int C, const int T, const int G, const float scale) {
#if defined(TURING_MMA_AVAILABLE)
    const int j = blockIdx.y, n = gridDim.y, z = blockIdx.z, ns = gridDim.z;
    const int r0 = blockIdx.x*HH_PF_TILE, R = G*T, RP = gridDim.x*HH_PF_TILE;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int sp = hh_pf_sp();

    extern __shared__ __align__(128) char smem_pf[];
    half  * q_s = (half *) smem_pf;                    // [64][dp]
    half  * k_s = q_s + HH_PF_TILE*hh_pf_dp(D);        // [64][dp]
    float * s_s = (float *) (k_s + HH_PF_TILE*hh_pf_dp(D)); // [64][sp]
    __shared__ float qp_r[HH_PF_TILE], pc[HH_PF_TILE];

    const float qmax = hh_pf_load_q(q_s, qp_r, q, q_nb1, q_nb2, qpos, j, r0, R, G, D);
    const half  * Kj = K + (int64_t) j*C*D;
    const float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    // two lanes per row (32 cells each), the warp's 16 rows at once
    const int ri = 16*warp + lane/2, hc = 32*(lane % 2);
    const float qp = qp_r[ri];
    float m = -INFINITY, l = 0.0f;
    for (int c0 = z*HH_PF_TILE; c0 < C; c0 += ns*HH_PF_TILE) {
        if (!hh_pf_tile_seen(pc, Pj, c0, C, qmax)) {
            continue;
        }
        hh_pf_load_k(k_s, Kj, c0, C, D);
        __syncthreads();
        hh_pf_logits(q_s, k_s, s_s, D, warp, scale);
        __syncwarp();
        float x[32];
        float mt = -INFINITY;
#pragma unroll
        for (int k = 0; k < 32; ++k) {
            x[k] = qp - pc[hc + k] > 0.0f ? s_s[ri*sp + hc + k] : -INFINITY;
            mt = fmaxf(mt, x[k]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffff, mt, 1));
        const float m_new = fmaxf(m, mt);
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < 32; ++k) {
            sum += x[k] == -INFINITY ? 0.0f : expf(x[k] - m_new);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        l = (m == -INFINITY ? 0.0f : l*expf(m - m_new)) + sum;
        m = m_new;
        __syncthreads(); // k_s, s_s and pc are the next tile's
    }
    if (hc == 0) {
        const int64_t pr = ((int64_t) z*n + j)*RP + r0 + ri;
        part_m[pr] = m;
        part_l[pr] = l;
    }
#else
    GGML_UNUSED_VARS(q, q_nb1, q_nb2, K, P, qpos, part_m, part_l, D, C, T, G, scale);
    NO_DEVICE_CODE;
#endif // defined(TURING_MMA_AVAILABLE)
}

// Pass 2, block (row tile, head j, split z): the rows' statistics merged from pass 1's splits, then the
// same logits again over the cell tiles z, z + ns, ..., now as final probabilities p = exp(l - m)/sum:
//  - their sums over the block's rows, per cell: part_c[row tile][j][C] (hh_pf_scores adds the row
//    tiles into the scores; cells of tiles nobody in the block sees get 0), the column sums flash
//    attention never forms;
//  - the output rows += p V on tensor cores, in registers (NB x 16 columns; no rescaling, the
//    probabilities are final): into dst when ns == 1, else into part_o[z] for hh_pf_merge.
template <int NB>
static __global__ void __launch_bounds__(HH_PF_WARPS*WARP_SIZE) hh_pf_out(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const half * __restrict__ K, const half * __restrict__ V, const float * __restrict__ P,
        const float * __restrict__ qpos, const float * __restrict__ part_m, const float * __restrict__ part_l, const int ns_m,
        float * __restrict__ dst, float * __restrict__ part_o, float * __restrict__ part_c,
        const int D, const int C, const int T, const int G, const float scale) {
#if defined(TURING_MMA_AVAILABLE)
    constexpr int Dv = 16*NB;
    const int j = blockIdx.y, n = gridDim.y, z = blockIdx.z, ns = gridDim.z, rt = blockIdx.x;
    const int r0 = rt*HH_PF_TILE, R = G*T, RP = gridDim.x*HH_PF_TILE;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int dp = hh_pf_dp(D), vp = hh_pf_vp(), sp = hh_pf_sp();
    static_assert(HH_PF_WARPS*WARP_SIZE == 2*HH_PF_TILE, "two threads per cell");

    extern __shared__ __align__(128) char smem_pf[];
    half  * q_s = (half *) smem_pf;             // [64][dp]
    half  * k_s = q_s + HH_PF_TILE*dp;          // [64][dp]
    float * s_s = (float *) (k_s + HH_PF_TILE*dp); // [64][sp]: logits, then probabilities
    half  * v_s = (half *) (s_s + HH_PF_TILE*sp);  // [Dv][vp]: the tile's V, transposed as stored (free cells: 0)
    half  * p_s = k_s;                          // [64][vp]: probabilities as f16, once the logits are done with k_s
    __shared__ float qp_r[HH_PF_TILE], m_r[HH_PF_TILE], il_r[HH_PF_TILE], pc[HH_PF_TILE], colsum[HH_PF_TILE];

    const float qmax = hh_pf_load_q(q_s, qp_r, q, q_nb1, q_nb2, qpos, j, r0, R, G, D);
    if (threadIdx.x < HH_PF_TILE) {
        const int r = r0 + threadIdx.x;
        float m = -INFINITY, l = 0.0f;
        for (int s = 0; s < ns_m; ++s) {
            m = fmaxf(m, part_m[((int64_t) s*n + j)*RP + r]);
        }
        for (int s = 0; s < ns_m; ++s) {
            const float ms = part_m[((int64_t) s*n + j)*RP + r];
            l += ms == -INFINITY ? 0.0f : expf(ms - m)*part_l[((int64_t) s*n + j)*RP + r];
        }
        m_r[threadIdx.x]  = m;
        il_r[threadIdx.x] = l > 0.0f ? 1.0f/l : 0.0f;
    }
    // (hh_pf_tile_seen's barrier publishes m_r and il_r)

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        wmma::fill_fragment(o[b], 0.0f);
    }
    const half  * Kj = K + (int64_t) j*C*D;
    const half  * Vj = V + (int64_t) j*C*Dv;
    const float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    float * cs = part_c + ((int64_t) rt*n + j)*C;
    const int ri = 16*warp + lane/2, hc = 32*(lane % 2), c = threadIdx.x % HH_PF_TILE, half_ = threadIdx.x / HH_PF_TILE;
    for (int c0 = z*HH_PF_TILE; c0 < C; c0 += ns*HH_PF_TILE) {
        if (!hh_pf_tile_seen(pc, Pj, c0, C, qmax)) {
            if (half_ == 0 && c0 + c < C) {
                cs[c0 + c] = 0.0f;
            }
            continue;
        }
        hh_pf_load_k(k_s, Kj, c0, C, D);
#pragma unroll 4
        for (int i = threadIdx.x; i < Dv*(HH_PF_TILE/8); i += blockDim.x) {
            const int d = i / (HH_PF_TILE/8), e = i % (HH_PF_TILE/8), cc = c0 + 8*e;
            uint4 u = make_uint4(0, 0, 0, 0);
            if (cc < C) {
                u = *(const uint4 *) (Vj + (int64_t) d*C + cc);
                half * h = (half *) &u;
#pragma unroll
                for (int k = 0; k < 8; ++k) { // a free cell's V may be anything (0 x NaN is NaN): as the CPU op, 0
                    h[k] = pc[8*e + k] == INFINITY ? __float2half(0.0f) : h[k];
                }
            }
            *(uint4 *) (v_s + d*vp + 8*e) = u;
        }
        __syncthreads();

        hh_pf_logits(q_s, k_s, s_s, D, warp, scale);
        __syncthreads(); // k_s becomes p_s
        {
            const float qp = qp_r[ri], m = m_r[ri], il = il_r[ri];
            float x[32];
#pragma unroll
            for (int k = 0; k < 32; ++k) {
                x[k] = qp - pc[hc + k] > 0.0f ? expf(s_s[ri*sp + hc + k] - m)*il : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < 32; ++k) {
                s_s[ri*sp + hc + k] = x[k];
                p_s[ri*vp + hc + k] = __float2half(x[k]);
            }
        }
        __syncthreads(); // every row's probabilities, for the column sums

        float acc = 0.0f;
#pragma unroll 8
        for (int i = half_*(HH_PF_TILE/2); i < (half_ + 1)*(HH_PF_TILE/2); ++i) {
            acc += s_s[i*sp + c];
        }
        if (half_ == 1) {
            colsum[c] = acc;
        }

        // output rows += p V (the warp's rows of p_s, written by this warp)
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> pa[HH_PF_TILE/16];
#pragma unroll
        for (int k = 0; k < HH_PF_TILE/16; ++k) {
            wmma::load_matrix_sync(pa[k], p_s + 16*warp*vp + 16*k, vp);
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int k = 0; k < HH_PF_TILE/16; ++k) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> vb; // V[cell][d], stored [d][cell]
                wmma::load_matrix_sync(vb, v_s + 16*b*vp + 16*k, vp);
                wmma::mma_sync(o[b], pa[k], vb, o[b]);
            }
        }
        __syncthreads(); // colsum, and k_s, v_s, s_s and pc are the next tile's
        if (half_ == 0 && c0 + c < C) {
            cs[c0 + c] = acc + colsum[c];
        }
    }

    // the output rows through shared memory (the tiles are done with it): dst rows are not evenly spaced
    __syncthreads();
    float * o_s = (float *) smem_pf; // [64][Dv + 4]
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        wmma::store_matrix_sync(o_s + 16*warp*(Dv + 4) + 16*b, o[b], Dv + 4, wmma::mem_row_major);
    }
    __syncwarp();
    for (int i = 16*warp; i < 16*warp + 16; ++i) {
        const int r = r0 + i;
        if (r >= R) {
            break;
        }
        float * out = ns == 1 ? dst + (int64_t) (r / G)*Dv*G*n + ((int64_t) j*G + r % G)*Dv
                              : part_o + (((int64_t) z*n + j)*RP + r)*Dv;
        for (int d = lane; d < Dv; d += WARP_SIZE) {
            out[d] = o_s[i*(Dv + 4) + d];
        }
    }
#else
    GGML_UNUSED_VARS(q, q_nb1, q_nb2, K, V, P, qpos, part_m, part_l, ns_m, dst, part_o, part_c, D, C, T, G, scale);
    NO_DEVICE_CODE;
#endif // defined(TURING_MMA_AVAILABLE)
}

// the output splits of hh_pf_out added up (their probabilities were already final): a block per (query row, head)
static __global__ void hh_pf_merge(const float * __restrict__ part_o, float * __restrict__ dst,
        const int Dv, const int G, const int RP, const int ns) {
    const int r = blockIdx.x, j = blockIdx.y, n = gridDim.y, t = r / G, g = r % G;
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < ns; ++z) {
            acc += part_o[(((int64_t) z*n + j)*RP + r)*Dv + d];
        }
        dst[(int64_t) t*Dv*G*n + ((int64_t) j*G + g)*Dv + d] = acc;
    }
}

// scores += the column sums of every row tile; cells free before the ubatch start again (new ones were
// set to 0 by hh_pf_write)
static __global__ void hh_pf_scores(const float * __restrict__ part_c, const float * __restrict__ P, float * __restrict__ S,
        const int C, const int n_rt) {
    const int j = blockIdx.y, n = gridDim.y, c = blockIdx.x*blockDim.x + threadIdx.x;
    if (c >= C) {
        return;
    }
    float sum = 0.0f;
    for (int rt = 0; rt < n_rt; ++rt) {
        sum += part_c[((int64_t) rt*n + j)*C + c];
    }
    float * s = S + (int64_t) j*C + c;
    *s = isinf(P[(int64_t) j*(C + GGML_FASTGEN_HH_P_PAD) + c]) ? sum : *s + sum;
}

static bool hh_pf_nb_built(int nb) {
#define HH_PF_NB_IS(NB) nb == NB ||
    return HH_PF_NB_CASES(HH_PF_NB_IS) false;
#undef HH_PF_NB_IS
}

bool ggml_cuda_fastgen_hh_attn_supported(int device, const ggml_tensor * op) {
    const ggml_tensor * q = op->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * K = op->src[GGML_FASTGEN_HH_K];
    const ggml_tensor * V = op->src[GGML_FASTGEN_HH_V];
    const int64_t n = K->ne[2];
    const bool common = K->type == GGML_TYPE_F16 && V->type == GGML_TYPE_F16 && ggml_is_contiguous(K) && ggml_is_contiguous(V) &&
           ggml_is_contiguous(op->src[GGML_FASTGEN_HH_S]) && ggml_is_contiguous(op->src[GGML_FASTGEN_HH_P]) &&
           op->src[GGML_FASTGEN_HH_P]->ne[0] == K->ne[1] + GGML_FASTGEN_HH_P_PAD &&
           op->op_params[1] >= 0 && op->op_params[1] + n <= op->src[GGML_FASTGEN_HH_IDXS]->ne[1] &&
           ggml_is_contiguous(op->src[GGML_FASTGEN_HH_QUERY_POS]) &&
           K->ne[0] % WARP_SIZE == 0 && K->ne[0] <= GGML_FASTGEN_HH_MAX_D &&
           K->ne[1] % 8 == 0 && K->ne[1] <= GGML_FASTGEN_HH_MAX_CELLS && q->ne[1] % n == 0 &&
           q->nb[0] == sizeof(float) && op->src[GGML_FASTGEN_HH_K_CUR]->nb[0] == sizeof(float) &&
           op->src[GGML_FASTGEN_HH_V_CUR]->nb[0] == sizeof(float) && ggml_is_contiguous(op);
    if (!common) {
        return false;
    }
    if ((q->ne[1]/n)*q->ne[2] <= GGML_FASTGEN_HH_MAX_ROWS) {
        return true; // decode kernel
    }
    // prefill kernels: tensor cores, an output kernel built for the head size, and the tiles' shared
    // memory (70 KB at head size 128, three blocks per SM on H100/H200; 121 KB at 256: H100/H200 and
    // A100 yes, GPUs with 99 KB per block no, those keep the composed path)
    const ggml_cuda_device_info::cuda_device_info & info = ggml_cuda_info().devices[device];
    const size_t smem = std::max(hh_pf_stats_smem(K->ne[0]), hh_pf_out_smem(K->ne[0], V->ne[1])) + HH_PF_STATIC_SMEM;
    return turing_mma_available(info.cc) && V->ne[1] % 16 == 0 && hh_pf_nb_built((int) (V->ne[1]/16)) && smem <= info.smpbo;
}

// dynamic shared memory above the default 48 KB needs an opt-in per kernel and device: raised to what
// this launch needs when it needs more than any launch before (supported() checked it fits)
static void hh_pf_smem_limit(const void * kernel, size_t & raised, size_t nbytes) {
    if (nbytes > raised) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) nbytes));
        raised = nbytes;
    }
}

static void hh_prefill(ggml_backend_cuda_context & ctx, const ggml_fastgen_hh_args & a, ggml_tensor * dst) {
    const int D = a.D, C = a.C, n = a.n, Dv = a.Dv, T = a.T, G = a.G, R = G*T, RP = (R + HH_PF_TILE - 1)/HH_PF_TILE*HH_PF_TILE;
    cudaStream_t stream = ctx.stream();
    half  * K = (half *) a.K->data, * V = (half *) a.V->data;
    float * S = (float *) a.S->data, * P = (float *) a.P->data;
    const float * qpos = (const float *) a.query_pos->data;

    // both passes split the cells when a layer has few heavy-hitter heads: about three blocks per SM
    const int nsm = ggml_cuda_info().devices[ctx.device].nsm;
    const int row_tiles = RP/HH_PF_TILE, cell_tiles = (C + HH_PF_TILE - 1)/HH_PF_TILE;
    const int ns = std::max(1, std::min(cell_tiles, (3*nsm + row_tiles*n - 1)/(row_tiles*n)));

    ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) ns*n*RP);
    ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) ns*n*RP);
    ggml_cuda_pool_alloc<float> part_o(ctx.pool(), ns > 1 ? (size_t) ns*n*RP*Dv : 1);
    ggml_cuda_pool_alloc<float> part_c(ctx.pool(), (size_t) row_tiles*n*C);

    hh_pf_write<<<dim3(T, n), 128, 0, stream>>>(
        (const char *) a.k_cur->data, a.k_cur->nb[1], a.k_cur->nb[2], (const char *) a.v_cur->data, a.v_cur->nb[1], a.v_cur->nb[2],
        (const int64_t *) a.idxs->data, a.idxs->nb[1]/sizeof(int64_t), a.h0, K, V, S, P, qpos, D, Dv, C);

    const dim3 grid(row_tiles, n, ns), block(HH_PF_WARPS*WARP_SIZE);
    static size_t raised_stats[GGML_CUDA_MAX_DEVICES] = {};
    hh_pf_smem_limit((const void *) hh_pf_stats, raised_stats[ctx.device], hh_pf_stats_smem(D));
    hh_pf_stats<<<grid, block, hh_pf_stats_smem(D), stream>>>(
        (const char *) a.q->data, a.q->nb[1], a.q->nb[2], K, P, qpos, part_m.get(), part_l.get(), D, C, T, G, a.scale);
#define HH_PF_OUT_CASE(NB) case NB: { \
        static size_t raised[GGML_CUDA_MAX_DEVICES] = {}; \
        hh_pf_smem_limit((const void *) hh_pf_out<NB>, raised[ctx.device], hh_pf_out_smem(D, Dv)); \
        hh_pf_out<NB><<<grid, block, hh_pf_out_smem(D, Dv), stream>>>((const char *) a.q->data, a.q->nb[1], a.q->nb[2], \
            K, V, P, qpos, part_m.get(), part_l.get(), ns, (float *) dst->data, part_o.get(), part_c.get(), D, C, T, G, a.scale); \
        } break;
    switch (Dv/16) {
        HH_PF_NB_CASES(HH_PF_OUT_CASE)
        default: GGML_ABORT("fastgen: value head size %d not supported by the prefill kernels", Dv);
    }
#undef HH_PF_OUT_CASE
    if (ns > 1) {
        hh_pf_merge<<<dim3(R, n), 128, 0, stream>>>(part_o.get(), (float *) dst->data, Dv, G, RP, ns);
    }
    hh_pf_scores<<<dim3((C + 255)/256, n), 256, 0, stream>>>(part_c.get(), P, S, C, row_tiles);
    CUDA_CHECK(cudaGetLastError());
}

void ggml_cuda_fastgen_hh_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ggml_cuda_fastgen_hh_attn_supported(ctx.device, dst));
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    if (a.G*a.T > GGML_FASTGEN_HH_MAX_ROWS) {
        hh_prefill(ctx, a, dst);
        return;
    }
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
