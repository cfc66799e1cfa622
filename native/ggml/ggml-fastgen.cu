// llama-fastgen: GGML_OP_FASTGEN_HH_ATTN on CUDA (see ggml-fastgen.h for the function).
//
// One kernel, flash-decoding style: a block per (head, chunk of HH_CHUNK cells). A block writes the
// new tokens that fall in its chunk (K, V, position: each cell belongs to one block, so nothing
// reads it before it is written), and if any query sees a cell of the chunk, computes the chunk's
// logits (four lanes per cell, four query rows at a time), their max and sum of exponentials per
// query row, and the unnormalized output (two threads per V row when two rows fit in the block, each
// over half of the chunk's cells, so every warp works: V is stored transposed, so a thread's cells
// are contiguous). Chunks nobody sees (free cells, the empty end of a young cache) stop after reading
// their positions: decoding a short context costs what its occupied cells cost, not the capacity.
// Only the chunks below hi (the second float of a head's position padding: cells [hi, C) are free)
// run: a young cache of up to 64 cells is one block, which normalizes its output and scores its
// cells itself. Otherwise the blocks of a head merge: when all blocks of the launch fit on the device
// at once (checked per launch), each waits for the others (a per-head counter), then scores its own
// cells from the logits it kept in shared memory and writes a share of the output; else the last
// block to finish merges alone, the logits kept in a scratch buffer. Either way the probabilities
// added to the scores are those the output used.
// Each step issues its loads together: at decode the kernel's time is its chain of memory round
// trips, not its bytes.
// One launch per layer: at depth 0 a decode step is dominated by per-kernel latency, not bytes.
//
// Prefill (more query rows than GGML_FASTGEN_HH_MAX_ROWS) takes four launches on tensor cores (mma.sync
// m16n8k16 through PTX, f16 in, f32 accumulate, as llama.cpp's mma flash attention), the CPU op's
// function in another order:
//  1. hh_pf_write: the ubatch's K, V and positions into its cells, their scores to 0; the store then
//     holds what the CPU op calls "cell positions as they will be after this ubatch";
//  2. hh_pf_stats: a block per (64 query rows, head, split) walks its share of the head's cells in
//     tiles of 64: each row's max logit and sum of exponentials (no output);
//  3. hh_pf_out: the same blocks merge the splits' statistics and compute the same logits again (same
//     f16 operands, same code: the same values), now as final probabilities: summed over the block's
//     rows per cell (the column sums flash attention never forms) and multiplied by V (the logits' C
//     fragments become the A fragments of p V; no rescaling, the probabilities are final);
//  4. hh_pf_scores adds the row tiles' column sums into the scores (hh_pf_merge first adds up the
//     output of the splits when there are several).
// Both passes keep the queries in registers, list the tiles some query of the block sees (free cells
// and the ubatch's later tokens are skipped) and load the next tile with cp.async while computing one.
#include "ggml-fastgen.cuh"
#include "ggml-fastgen.h"
#include "llama-fastgen-env.h"

#include "cp-async.cuh"

#include <cstring>
#include <map>
#include <tuple>

#define HH_CHUNK 64 // cells per block: 8 warps x 8 cells x 4 lanes
static_assert(GGML_FASTGEN_HH_P_PAD >= 3, "hh_attn keeps two counters and hi in a head's position padding");
#define HH_WARPS 8

// each token's own share of a cell's kept attention (ggml-fastgen.h), for a rollback: query rows
// t*G .. t*G+G-1 are token t's; prob(r) is row r's probability of the cell, from wherever a path holds it
template <typename P>
static __device__ __forceinline__ void hh_write_undo(float * U, const float * qp_s, const int T, const int G,
        const int n_undo, const int64_t u_s2, const int64_t cell, const P & prob) {
    for (int t = 0; t < T; ++t) {
        float ut = 0.0f;
        for (int r = t*G; r < (t + 1)*G; ++r) {
            ut += prob(r);
        }
        U[(int64_t) ((int) qp_s[t] % n_undo)*u_s2 + cell] = ut;
    }
}

// DL = D / 32: a cell's 4 lanes hold DL x 8 K elements each; RB query rows per register block.
// No __restrict__: with programmatic dependent launch (below) the compiler could move a load above the
// wait for the previous kernel. llama.cpp drops it in Hopper builds only (GGML_CUDA_RESTRICT, its PR 24030),
// on locals: the macro differs between the host and device passes, so on parameters the kernel's two
// signatures would not match. Here it is dropped for every architecture.
template <int DL, int RB>
static __global__ void __launch_bounds__(HH_WARPS*WARP_SIZE) hh_attn(
        const char * q, const int64_t q_nb1, const int64_t q_nb2,
        const char * kc, const int64_t kc_nb1, const int64_t kc_nb2,
        const char * vc, const int64_t vc_nb1, const int64_t vc_nb2,
        const int64_t * idxs, const int64_t idxs_s1, const int h0,
        half * K, half * V, float * S, float * P,
        const float * qpos, float * dst,
        float * logits, float * part_m, float * part_l, float * part_o,
        float * U, const int64_t u_s2, const int n_undo,
        const int Dv, const int C, const int T, const int G, const float scale, const bool coop, const bool pdl,
        const bool kbatch) {
    constexpr int D = DL*WARP_SIZE;
    const int j = blockIdx.x, sp = blockIdx.y, ns = gridDim.y, c0 = sp*HH_CHUNK, n = gridDim.x;
    const int R = G*T, RP = (R + RB - 1)/RB*RB;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;

    extern __shared__ float smem[];
    float * q_s = smem;        // [R][D]
    float * w_s = smem + R*D;  // [RP][HH_CHUNK]: logits, then weights exp(l - m) (rows >= R: 0)
    // V rows and parts of the chunk per thread (step 2): two parts when two rows fit in the block
    const int np = 2*Dv <= HH_WARPS*WARP_SIZE ? 2 : 1;
    float * red_s = w_s + RP*HH_CHUNK; // np == 2: [2][RB][Dv] the second part's output sums, by parity of r0/RB
    float * lg_s = red_s + (np == 2 ? 2*RB*Dv : 0); // coop: [R][HH_CHUNK] the chunk's logits, kept for its scores
    __shared__ int64_t new_c[GGML_FASTGEN_HH_MAX_ROWS], dof_s[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ float   qp_s[GGML_FASTGEN_HH_MAX_ROWS], qpr_s[GGML_FASTGEN_HH_MAX_ROWS], m_s[GGML_FASTGEN_HH_MAX_ROWS],
                       inv_s[GGML_FASTGEN_HH_MAX_ROWS];
    __shared__ bool    last;
    __shared__ int     hi_s;
    // cells of the chunk whose stored V is not read: free ones (they hold no token; as the CPU op, their V
    // counts as 0) and the new tokens' (theirs comes from v_cur)
    __shared__ __align__(8) unsigned char zv_s[HH_CHUNK];

    half  * Kj = K + (int64_t) j*C*D;
    half  * Vj = V + (int64_t) j*C*Dv;
    float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    unsigned int * done = (unsigned int *) (Pj + C); // the row's padding: [0] zero between launches,
    float * hi_p = Pj + C + 1;                         // [1] cells [hi, C) are free (ggml-fastgen.h),
    unsigned int * left = (unsigned int *) (Pj + C + 2); // [2] coop: blocks done merging, zero between launches
    float * Sj = S + (int64_t) j*C;
    float * pm = part_m + ((int64_t) j*ns + sp)*R;
    float * pl = part_l + ((int64_t) j*ns + sp)*R;

    // Programmatic dependent launch, as llama.cpp's own kernels: the next kernel may launch (its blocks
    // wait in their own sync) once every block of this one runs, and this one's blocks are resident while
    // the previous kernel finishes; they wait here until its writes are visible. A launch that breaks the
    // chain costs both neighbours their overlap. (Every block has started before anything launches
    // behind it, so the merge's wait for the head's other blocks cannot be starved by a later kernel.)
    // pdl = 0 (LLAMA_FASTGEN_CUDA_PDL=0): no trigger either, so nothing launches behind this kernel early; the
    // wait returns at once in a plain launch
    if (pdl) {
        ggml_cuda_pdl_lc();
    }
    ggml_cuda_pdl_sync();

    // Decoding is a chain of memory round trips, not bandwidth: the chunk's work takes two (what the
    // cells hold; then their K and V).
    // 1. this lane's cell (lane `sub` of 4 holds elements (i*4 + sub)*8 .. +8) and position, the new
    //    tokens' cells and positions, the queries
    const int cl = warp*(WARP_SIZE/4) + lane/4, sub = lane % 4, c = c0 + cl;
    float cp = c < C ? Pj[c] : INFINITY;
    const float s_old = sub == 0 && c < C ? Sj[c] : 0.0f; // for the paths where a block scores its own cells
    if (threadIdx.x == 0) {
        hi_s = (int) *hi_p;
    }
    if (threadIdx.x < T) {
        new_c[threadIdx.x] = idxs[(h0 + j)*idxs_s1 + threadIdx.x];
        qp_s[threadIdx.x]  = qpos[threadIdx.x];
    }
    if (threadIdx.x < R) { // per query row: its token's position and where its output goes (no divisions later)
        const int r = threadIdx.x;
        qpr_s[r] = qpos[r / G];
        dof_s[r] = (int64_t) (r / G)*Dv*G*n + ((int64_t) j*G + r % G)*Dv;
    }
    for (int i = threadIdx.x; i < R*D; i += blockDim.x) {
        const int r = i / D, d = i % D, t = r / G, g = r % G;
        q_s[i] = ((const float *) (q + (int64_t) (j*G + g)*q_nb1 + t*q_nb2))[d];
    }
    __syncthreads();
    int tn = -1, hi = hi_s;
    float qp_max = -INFINITY;
    for (int t = 0; t < T; ++t) {
        tn = new_c[t] == c ? t : tn;
        qp_max = fmaxf(qp_max, qp_s[t]);
        hi = max(hi, (int) new_c[t] + 1);
    }
    // Only the chunks below hi hold tokens: the others stop here (and are not counted). A young
    // cache (hi <= 64: decoding the first tokens) is one chunk: its block finishes the head alone,
    // with no partial results in global memory and no merge.
    const int na = min(ns, (hi + HH_CHUNK - 1)/HH_CHUNK);
    if (sp >= na) {
        return;
    }
    if (sp == 0 && threadIdx.x == 0 && hi > hi_s) {
        *hi_p = (float) hi; // the other blocks of this launch read hi_s or this: both give the same hi
    }
    const bool single = na == 1; // then chunk 0 holds the new tokens: the block computes below
    const bool any = qp_max - cp > 0.0f; // occupied and before some query
    if (!__syncthreads_or(tn >= 0 || any)) {
        for (int r = threadIdx.x; r < R; r += blockDim.x) {
            pm[r] = -INFINITY; // the merge skips this chunk
            pl[r] = 0.0f;
        }
    } else {
        // 2. the V row of this thread's output column, and K of this lane's cell, all loads in flight
        //    together before the first store (no __restrict__: a store would hold back every load after it).
        // One thread per V row and part of the chunk's cells (Dv <= the block's threads): V is stored
        // transposed, so a part's cells are contiguous 16-byte loads (cells past C: 0, and their weights
        // are 0). Two parts when two rows fit in the block: every warp works. The new tokens of the part:
        // this thread writes their V into the store (rounded as stored) and takes it from v_cur below.
        const int cpp = HH_CHUNK/np; // cells per part
        const int part = threadIdx.x / Dv, d = threadIdx.x % Dv, cv0 = part*cpp;
        const bool vt = part < np;
        const int nc8 = min(cpp, C - c0 - cv0)/8; // C % 8 == 0
        uint4 vu[HH_CHUNK/8];
        float vn0 = 0.0f; // the first new token of the part: its V
        int   cn0 = -1;   //   and its cell in the part
        if (vt) {
            const uint4 * vrow = (const uint4 *) (Vj + (int64_t) d*C + c0 + cv0);
#pragma unroll
            for (int i = 0; i < HH_CHUNK/8; ++i) {
                vu[i] = i < nc8 ? vrow[i] : make_uint4(0, 0, 0, 0);
            }
        }
        // K of this lane's cell (a new token's from k_cur: into the store, rounded as stored)
        float k[DL*8];
        if (tn >= 0) {
            const float * kr = (const float *) (kc + j*kc_nb1 + tn*kc_nb2);
            // kbatch: the row's DL*2 float4 loads first, then its stores (kc's rows 16-byte aligned: the host checks);
            // LLAMA_FASTGEN_CUDA_KBATCH=0: loads and stores interleaved (each store holds the next loads back)
            float4 kf[DL*2];
            if (kbatch) {
#pragma unroll
                for (int i = 0; i < DL; ++i) {
                    kf[2*i + 0] = ((const float4 *) (kr + (i*4 + sub)*8))[0];
                    kf[2*i + 1] = ((const float4 *) (kr + (i*4 + sub)*8))[1];
                }
            }
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                __align__(16) half h[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float x = kbatch ? (e < 4 ? (&kf[2*i].x)[e] : (&kf[2*i + 1].x)[e - 4]) : kr[(i*4 + sub)*8 + e];
                    h[e] = __float2half(x);
                    k[i*8 + e] = __half2float(h[e]);
                }
                *(uint4 *) (Kj + (int64_t) c*D + (i*4 + sub)*8) = *(const uint4 *) h;
            }
            cp = qp_s[tn] - 0.5f;
            if (sub == 0) {
                Pj[c] = cp;
            }
        } else {
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
        if (vt) { // the part's new tokens: this thread writes their V into the store (rounded as stored)
            for (int t = 0; t < T; ++t) {
                const int64_t cn = new_c[t] - c0 - cv0;
                if (cn >= 0 && cn < cpp) {
                    const half hv = __float2half(((const float *) (vc + j*vc_nb1 + t*vc_nb2))[d]);
                    Vj[new_c[t] + (int64_t) d*C] = hv;
                    if (cn0 < 0) {
                        cn0 = (int) cn;
                        vn0 = __half2float(hv);
                    }
                }
            }
        }
        if (sub == 0) {
            zv_s[cl] = isinf(cp) || tn >= 0; // past C: free
        }
        for (int i = threadIdx.x; i < (RP - R)*HH_CHUNK; i += blockDim.x) {
            w_s[R*HH_CHUNK + i] = 0.0f;
        }

        // 3. logits, four query rows at a time (four independent sums in flight; each row's sum in the
        //    same order as one row at a time)
        for (int r0 = 0; r0 < R; r0 += 4) {
            float acc[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
#pragma unroll
            for (int i = 0; i < DL; ++i) {
#pragma unroll
                for (int rr = 0; rr < 4; ++rr) {
                    const float4 * qa = (const float4 *) (q_s + min(r0 + rr, R - 1)*D + (i*4 + sub)*8); // rows past R: not kept
                    const float4 x = qa[0], y = qa[1];
                    const float * ki = k + i*8;
                    acc[rr] += x.x*ki[0]; acc[rr] += x.y*ki[1]; acc[rr] += x.z*ki[2]; acc[rr] += x.w*ki[3];
                    acc[rr] += y.x*ki[4]; acc[rr] += y.y*ki[5]; acc[rr] += y.z*ki[6]; acc[rr] += y.w*ki[7];
                }
            }
#pragma unroll
            for (int rr = 0; rr < 4; ++rr) {
                acc[rr] += __shfl_xor_sync(0xffffffff, acc[rr], 1);
                acc[rr] += __shfl_xor_sync(0xffffffff, acc[rr], 2);
                const int r = r0 + rr;
                if (sub == 0 && r < R) {
                    w_s[r*HH_CHUNK + cl] = qpr_s[r] - cp > 0.0f ? acc[rr]*scale : -INFINITY;
                }
            }
        }
        __syncthreads();

        // 4. per query row: the chunk's max and sum of exponentials; logits kept for the merge
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
                if (coop) {
                    lg_s[r*HH_CHUNK + i] = l;
                } else if (!single && c0 + i < C) {
                    logits[((int64_t) j*R + r)*C + c0 + i] = l;
                }
                w_s[r*HH_CHUNK + i] = w;
                s += w;
            }
            s = warp_reduce_sum(s);
            if (lane == 0) {
                pm[r]    = m;
                pl[r]    = s;
                inv_s[r] = s > 0.0f ? 1.0f/s : 0.0f; // single: the row's final normalization
            }
        }
        __syncthreads();

        // 5. the chunk's unnormalized output, RB rows at a time: each part sums its cells, the second part
        //    hands its sums to the first through shared memory
        for (int r0 = 0; r0 < R; r0 += RB) {
            float acc[RB] = { 0.0f };
            if (vt) {
#pragma unroll
                for (int i = 0; i < HH_CHUNK/8; ++i) {
                    if (i >= cpp/8) {
                        break;
                    }
                    const int cb = cv0 + 8*i;
                    uint4 u = vu[i];
                    const uint2 zr = *(const uint2 *) (zv_s + cb);
                    if (zr.x | zr.y) { // a free cell's V may be anything (0 x NaN is NaN)
                        half * hv = (half *) &u;
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            hv[e] = zv_s[cb + e] ? __float2half(0.0f) : hv[e];
                        }
                    }
                    const half2 * h = (const half2 *) &u;
                    const float2 v0 = __half22float2(h[0]), v1 = __half22float2(h[1]);
                    const float2 v2 = __half22float2(h[2]), v3 = __half22float2(h[3]);
#pragma unroll
                    for (int rr = 0; rr < RB; ++rr) {
                        const float4 wa = *(const float4 *) (w_s + (r0 + rr)*HH_CHUNK + cb);
                        const float4 wb = *(const float4 *) (w_s + (r0 + rr)*HH_CHUNK + cb + 4);
                        acc[rr] += wa.x*v0.x + wa.y*v0.y + wa.z*v1.x + wa.w*v1.y + wb.x*v2.x + wb.y*v2.y + wb.z*v3.x + wb.w*v3.y;
                    }
                }
                for (int t = 0; t < T; ++t) { // the part's new tokens
                    const int64_t cn = new_c[t] - c0 - cv0;
                    if (cn >= 0 && cn < cpp) {
                        const float v = cn == cn0 ? vn0 :
                            __half2float(__float2half(((const float *) (vc + j*vc_nb1 + t*vc_nb2))[d]));
#pragma unroll
                        for (int rr = 0; rr < RB; ++rr) {
                            acc[rr] += w_s[(r0 + rr)*HH_CHUNK + cv0 + cn]*v;
                        }
                    }
                }
            }
            if (np == 2) {
                float * rs = red_s + ((r0/RB) % 2)*RB*Dv;
                if (vt && part == 1) {
#pragma unroll
                    for (int rr = 0; rr < RB; ++rr) {
                        rs[rr*Dv + d] = acc[rr];
                    }
                }
                __syncthreads();
                if (part == 0) {
#pragma unroll
                    for (int rr = 0; rr < RB; ++rr) {
                        acc[rr] += rs[rr*Dv + d];
                    }
                }
            }
            if (part == 0) {
#pragma unroll
                for (int rr = 0; rr < RB; ++rr) {
                    const int r = r0 + rr;
                    if (r < R && single) {
                        dst[dof_s[r] + d] = acc[rr]*inv_s[r];
                    } else if (r < R) {
                        part_o[(((int64_t) j*ns + sp)*R + r)*Dv + d] = acc[rr];
                    }
                }
            }
        }
        if (single) {
            // the chunk's probabilities summed over the query rows into its cells' scores; a free
            // cell (its weights are 0) or a new token's starts again from 0
            if (sub == 0 && c < C) {
                float acc = 0.0f;
                for (int r = 0; r < R; ++r) {
                    acc += w_s[r*HH_CHUNK + cl]*inv_s[r];
                }
                Sj[c] = isinf(cp) || tn >= 0 ? acc : s_old + acc;
                if (U) {
                    hh_write_undo(U, qp_s, T, G, n_undo, u_s2, (int64_t) j*C + c,
                                  [&](int r) { return w_s[r*HH_CHUNK + cl]*inv_s[r]; });
                }
            }
            return;
        }
    }

    if (coop) {
        // Every block of the head merges (the launch checked that all blocks fit on the device at
        // once, so waiting for the others cannot deadlock. Beside a flash attention on a second stream,
        // ggml-fastgen-streams.cu, the missing blocks wait for its blocks, which wait only for kernels whose
        // blocks have all started (programmatic launch: nothing launches behind a kernel before all its
        // blocks run), so they drain): each scores its own cells from the logits it still holds and writes a
        // share of the output. No block waits for one merging block.
        // One fence, by thread 0 after the barrier, publishes the block's partial results (as cooperative
        // groups' grid sync does): per-thread fences stalled every warp on the writes' round trip.
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(done, 1u);
            while (*(volatile unsigned int *) done < (unsigned int) na) {
            }
            __threadfence();
        }
        __syncthreads();
    } else {
        // the last block of head j to get here merges its chunks (threadFenceReduction pattern)
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            last = atomicAdd(done, 1u) == (unsigned int) na - 1;
            if (last) {
                *done = 0; // ready for the next launch (stream order)
            }
        }
        __syncthreads();
        if (!last) {
            return;
        }
        __threadfence();
    }

    // Other blocks' results: read past L1 (__ldcg), which is not coherent between blocks. Each step's
    // loads are issued together, and a thread's first output element's partial sums (of up to NO_PRE
    // chunks) are requested before the rows' statistics: the statistics and the output take one round
    // trip, not two (session 26's trace: a head's output blocks lagged its others by up to 4 us).
    constexpr int NS_LANE = GGML_FASTGEN_HH_MAX_CELLS/HH_CHUNK/WARP_SIZE; // chunks per lane, at most
    float * f_s = coop ? lg_s + R*HH_CHUNK : smem; // [ns][R]: weight of each chunk's partial sums
    __shared__ bool seen_s[GGML_FASTGEN_HH_MAX_CELLS/HH_CHUNK];
    constexpr int NO_PRE = 16; // a store of 1,024 cells
    float o_pre[NO_PRE];
    const int i_first = (coop ? sp*blockDim.x : 0) + threadIdx.x; // this thread's first output element
    if (i_first < R*Dv) {
#pragma unroll
        for (int s = 0; s < NO_PRE; ++s) {
            o_pre[s] = s < na ? __ldcg(part_o + (((int64_t) j*ns + s)*R + i_first / Dv)*Dv + i_first % Dv) : 0.0f;
        }
    }
    for (int r = warp; r < R; r += HH_WARPS) {
        float ms[NS_LANE], ls[NS_LANE];
#pragma unroll
        for (int k = 0; k < NS_LANE; ++k) {
            const int s = lane + k*WARP_SIZE;
            ms[k] = s < na ? __ldcg(part_m + ((int64_t) j*ns + s)*R + r) : -INFINITY;
            ls[k] = s < na ? __ldcg(part_l + ((int64_t) j*ns + s)*R + r) : 0.0f;
        }
        float m = -INFINITY;
#pragma unroll
        for (int k = 0; k < NS_LANE; ++k) {
            m = fmaxf(m, ms[k]);
        }
        m = warp_reduce_max(m);
        float l = 0.0f;
#pragma unroll
        for (int k = 0; k < NS_LANE; ++k) {
            const int s = lane + k*WARP_SIZE;
            const float f = ms[k] == -INFINITY ? 0.0f : expf(ms[k] - m);
            if (s < na) {
                f_s[s*R + r] = f;
            }
            l += f*ls[k];
        }
        l = warp_reduce_sum(l);
        if (lane == 0) {
            m_s[r]   = m;
            inv_s[r] = l > 0.0f ? 1.0f/l : 0.0f;
        }
    }
    __syncthreads();
    for (int s = threadIdx.x; s < ns; s += blockDim.x) {
        bool seen = false; // chunks from na on: f_s not written, not seen
        for (int r = 0; s < na && r < R; ++r) {
            seen = seen || f_s[s*R + r] != 0.0f;
        }
        seen_s[s] = seen;
    }

    // chunks nobody saw wrote no partial output: their f is 0, and what their slots hold is not used
    // coop: the head's outputs spread over its na blocks
    for (int i = i_first; i < R*Dv; i += (coop ? na : 1)*blockDim.x) {
        const int r = i / Dv, d = i % Dv;
        float acc = 0.0f;
        int s0 = 0;
        if (i == i_first) {
#pragma unroll
            for (int s = 0; s < NO_PRE; ++s) {
                const float f = s < na ? f_s[s*R + r] : 0.0f;
                acc += f != 0.0f ? f*o_pre[s] : 0.0f;
            }
            s0 = min(na, NO_PRE);
        }
#pragma unroll 16
        for (int s = s0; s < na; ++s) {
            const float f = f_s[s*R + r];
            const float o = __ldcg(part_o + (((int64_t) j*ns + s)*R + r)*Dv + d);
            acc += f != 0.0f ? f*o : 0.0f;
        }
        dst[dof_s[r] + d] = acc*inv_s[r];
    }
    __syncthreads(); // seen_s

    if (coop) {
        // this chunk's cells, from the logits in shared memory, as the loop below does from global
        if (seen_s[sp] && sub == 0 && c < C) {
            float acc = 0.0f;
#pragma unroll 4
            for (int r = 0; r < R; ++r) {
                const float l = lg_s[r*HH_CHUNK + cl];
                acc += l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
            }
            Sj[c] = isinf(cp) || tn >= 0 ? acc : s_old + acc;
            if (U) {
                hh_write_undo(U, qp_s, T, G, n_undo, u_s2, (int64_t) j*C + c, [&](int r) {
                    const float l = lg_s[r*HH_CHUNK + cl];
                    return l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
                });
            }
        }
        __syncthreads();
        if (threadIdx.x == 0 && atomicAdd(left, 1u) == (unsigned int) na - 1) {
            *done = 0; // every block is past the wait: ready for the next launch (stream order)
            *left = 0;
        }
        return;
    }

    // scores of the cells of the chunks somebody saw, four cells a thread at a time; a free or reused
    // cell starts again from 0
    for (int cb = threadIdx.x; cb < C; cb += 4*blockDim.x) {
        bool  ok[4];
        float p_old[4], s_prev[4], acc[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c1 = cb + u*blockDim.x;
            ok[u]     = c1 < C && seen_s[c1 / HH_CHUNK];
            p_old[u]  = ok[u] ? __ldcg(Pj + c1) : 0.0f;
            s_prev[u] = ok[u] ? Sj[c1] : 0.0f;
            acc[u]    = 0.0f;
        }
#pragma unroll 4
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const float l = ok[u] ? __ldcg(logits + ((int64_t) j*R + r)*C + cb + u*blockDim.x) : -INFINITY;
                acc[u] += l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c1 = cb + u*blockDim.x;
            if (!ok[u]) {
                continue;
            }
            bool reset = isinf(p_old[u]);
            for (int t = 0; t < T; ++t) {
                reset = reset || new_c[t] == c1;
            }
            Sj[c1] = reset ? acc[u] : s_prev[u] + acc[u];
        }
    }
    // each token's own (ggml-fastgen.h), for a rollback: the same sums, split by token
    for (int c1 = threadIdx.x; U && c1 < C; c1 += blockDim.x) {
        if (!seen_s[c1 / HH_CHUNK]) {
            continue;
        }
        hh_write_undo(U, qp_s, T, G, n_undo, u_s2, (int64_t) j*C + c1, [&](int r) {
            const float l = __ldcg(logits + ((int64_t) j*R + r)*C + c1);
            return l == -INFINITY ? 0.0f : expf(l - m_s[r])*inv_s[r];
        });
    }
}

#define HH_PF_TILE  64 // query rows per block (16 per warp), and cells per tile
#define HH_PF_WARPS 4
#define HH_PF_MAX_SPLIT 4 // cell splits of one prefill layer (hh_prefill says why)
#define HH_PF_MAX_TILES (GGML_FASTGEN_HH_MAX_CELLS/HH_PF_TILE)
// head sizes (K and V alike) the prefill kernels are built for: the queries' fragments and the output
// accumulators stay in registers; other sizes keep the composed path
#define HH_PF_D_CASES(X) X(64) X(128)
#if defined(AMPERE_MMA_AVAILABLE) && defined(CP_ASYNC_AVAILABLE)
#define HH_PF_AVAILABLE
#endif

// dynamic shared memory: two buffers (the next tile loads while this one computes), each the tile's K
// rows [64][D], its V rows [Dv][64] (transposed, as stored; Dv = 0: the statistics pass) and its cells'
// positions [64]
static size_t hh_pf_smem(int D, int Dv) {
    return 2*(sizeof(half)*HH_PF_TILE*(D + Dv) + sizeof(float)*HH_PF_TILE);
}
// the kernels' static shared memory (row statistics, column sums, the list of tiles), rounded up
#define HH_PF_STATIC_SMEM 4096

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
        float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
        Pj[c] = qpos[t] - 0.5f;
        atomicMax((int *) (Pj + C + 1), __float_as_int((float) (c + 1))); // non-negative floats order as ints
        S[(int64_t) j*C + c] = 0.0f; // a new or reused cell starts from this ubatch's attention
    }
}

#if defined(HH_PF_AVAILABLE)
// Tiles live in shared memory as rows of w halves (w >= 64) whose 16-byte chunks are XOR-swizzled by the
// row: ldmatrix then reads 8 rows without bank conflicts, and no padding is needed. Half index of chunk ch of row r:
static __device__ __forceinline__ int hh_pf_swz(int r, int ch, int w) {
    return r*w + ((ch ^ (r & 7)) << 3);
}

static __device__ __forceinline__ void hh_ldmatrix_x4(uint32_t (&r)[4], const half * p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(ggml_cuda_cvta_generic_to_shared((void *) p)));
}

// d += a b on tensor cores: a 16 x 16 (row-major fragment), b 16 x 8 (column-major), f16 in, f32 accumulate
static __device__ __forceinline__ void hh_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t b0, const uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Both prefill passes take the logits in log2 units (scale x log2 e), so that exponentials are exp2f; their row
// statistics (part_m) stay in those units between the passes.
static constexpr float HH_PF_LOG2E = 1.4426950408889634f;

// What both passes start with, block (row tile at r0, head j, split z of ns):
//  - the block's query rows (r = t*G + g) as f16 A fragments in registers, the warp's 16 rows (rows past R:
//    zero), staged through `stage` ([64][D] halves, swizzled); their positions in qp_r (-inf past R);
//  - which of the split's cell tiles (z, z + ns, ...) some row of the block sees (seen[k]; free cells and
//    the ubatch's later tokens are seen by nobody), and those tiles' indices k in order (list).
// Returns how many are seen. Ends in a barrier.
template <int D>
static __device__ int hh_pf_begin(uint32_t (&qa)[D/16][4], half * stage, float * qp_r, unsigned char * seen, uint16_t * list,
        const char * q, const int64_t q_nb1, const int64_t q_nb2, const float * qpos, const float * Pj,
        const int j, const int r0, const int R, const int G, const int C, const int z, const int ns, const int nt) {
    __shared__ float qmax_s;
    __shared__ int   n_seen_s;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    for (int i = threadIdx.x; i < HH_PF_TILE*D/8; i += blockDim.x) {
        const int rr = i / (D/8), ch = i % (D/8), r = r0 + rr;
        __align__(16) half h[8];
        const float * x = (const float *) (q + (int64_t) (j*G + r % G)*q_nb1 + (int64_t) (r / G)*q_nb2) + 8*ch;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            h[e] = __float2half(r < R ? x[e] : 0.0f);
        }
        *(uint4 *) (stage + hh_pf_swz(rr, ch, D)) = *(const uint4 *) h;
    }
    if (threadIdx.x < HH_PF_TILE) {
        const int r = r0 + threadIdx.x;
        qp_r[threadIdx.x] = r < R ? qpos[r / G] : -INFINITY;
    }
    __syncthreads();
    if (warp == 0) {
        const float m = warp_reduce_max(fmaxf(qp_r[lane], qp_r[lane + WARP_SIZE]));
        if (lane == 0) {
            qmax_s = m;
        }
    }
    __syncthreads();
    const float qmax = qmax_s;
    for (int k = warp; k < nt; k += HH_PF_WARPS) { // a warp per tile, two cells per lane
        const int c = (z + k*ns)*HH_PF_TILE + lane;
        const float p0 = c < C ? Pj[c] : INFINITY, p1 = c + WARP_SIZE < C ? Pj[c + WARP_SIZE] : INFINITY;
        const bool s = __any_sync(0xffffffff, qmax - p0 > 0.0f || qmax - p1 > 0.0f);
        if (lane == 0) {
            seen[k] = s;
        }
    }
#pragma unroll
    for (int ks = 0; ks < D/16; ++ks) { // A fragment: rows lane % 16, columns 16 ks + 8 (lane / 16)
        hh_ldmatrix_x4(qa[ks], stage + hh_pf_swz(16*warp + lane % 16, 2*ks + lane/16, D));
    }
    __syncthreads();
    if (warp == 0) {
        int cnt = 0;
        for (int k0 = 0; k0 < nt; k0 += WARP_SIZE) {
            const bool s = k0 + lane < nt && seen[k0 + lane];
            const unsigned int b = __ballot_sync(0xffffffff, s);
            if (s) {
                list[cnt + __popc(b & ((1u << lane) - 1))] = (uint16_t) (k0 + lane);
            }
            cnt += __popc(b);
        }
        if (lane == 0) {
            n_seen_s = cnt;
        }
    }
    __syncthreads();
    return n_seen_s;
}

// cells [c0, c0 + 64) of a head into a tile buffer, asynchronously: K rows, V rows (Dv > 0) and positions;
// past C zeros and +inf. C % 8 == 0, so 8 cells (one chunk of a V row) are all in or all out.
template <int D, int Dv>
static __device__ void hh_pf_load_tile(half * k_s, half * v_s, float * p_s, const half * Kj, const half * Vj, const float * Pj,
        const int c0, const int C) {
    for (int i = threadIdx.x; i < HH_PF_TILE*(D/8); i += HH_PF_WARPS*WARP_SIZE) {
        const int c = i / (D/8), ch = i % (D/8);
        half * d = k_s + hh_pf_swz(c, ch, D);
        if (c0 + c < C) {
            cp_async_cg_16<0>(ggml_cuda_cvta_generic_to_shared(d), Kj + (int64_t) (c0 + c)*D + 8*ch);
        } else {
            *(uint4 *) d = make_uint4(0, 0, 0, 0);
        }
    }
    if constexpr (Dv > 0) {
        for (int i = threadIdx.x; i < Dv*(HH_PF_TILE/8); i += HH_PF_WARPS*WARP_SIZE) {
            const int dv = i / (HH_PF_TILE/8), ch = i % (HH_PF_TILE/8);
            half * d = v_s + hh_pf_swz(dv, ch, HH_PF_TILE);
            if (c0 + 8*ch < C) {
                cp_async_cg_16<0>(ggml_cuda_cvta_generic_to_shared(d), Vj + (int64_t) dv*C + c0 + 8*ch);
            } else {
                *(uint4 *) d = make_uint4(0, 0, 0, 0);
            }
        }
    }
    if (threadIdx.x < HH_PF_TILE/4) {
        const int c = c0 + 4*threadIdx.x;
        if (c < C) {
            cp_async_cg_16<0>(ggml_cuda_cvta_generic_to_shared(p_s + 4*threadIdx.x), Pj + c);
        } else {
            *(float4 *) (p_s + 4*threadIdx.x) = make_float4(INFINITY, INFINITY, INFINITY, INFINITY);
        }
    }
}

// logits (scaled) of the warp's 16 query rows x the tile's 64 cells, as 8 C fragments: s[b] holds cells
// 8 b + 2 (lane % 4) + {0, 1} of rows lane / 4 (s[b][0..1]) and lane / 4 + 8 (s[b][2..3]). Both passes
// call this with the same operands, so the statistics and the probabilities see the same logits.
template <int D>
static __device__ __forceinline__ void hh_pf_logits(float (&s)[HH_PF_TILE/8][4], const uint32_t (&qa)[D/16][4],
        const half * k_s, const float scale) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int b = 0; b < HH_PF_TILE/8; ++b) {
        s[b][0] = s[b][1] = s[b][2] = s[b][3] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < D/16; ++ks) {
#pragma unroll
        for (int b = 0; b < HH_PF_TILE/16; ++b) { // B fragments of cells 16 b .. 16 b + 15: K rows, as stored
            uint32_t kb[4];
            hh_ldmatrix_x4(kb, k_s + hh_pf_swz(16*b + lane % 8 + 8*(lane/16), 2*ks + (lane/8) % 2, D));
            hh_mma(s[2*b + 0], qa[ks], kb[0], kb[1]);
            hh_mma(s[2*b + 1], qa[ks], kb[2], kb[3]);
        }
    }
#pragma unroll
    for (int b = 0; b < HH_PF_TILE/8; ++b) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[b][e] = __fmul_rn(s[b][e], scale); // never contracted into another operation
        }
    }
}
#endif // defined(HH_PF_AVAILABLE)

// Pass 1, block (row tile, head j, split z): the max logit and sum of exponentials of each query row
// over the seen cell tiles z, z + ns, ... (part_m, part_l [ns][n][RP]); the output pass merges the splits.
template <int D>
static __global__ void __launch_bounds__(HH_PF_WARPS*WARP_SIZE) hh_pf_stats(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const half * __restrict__ K, const float * __restrict__ P, const float * __restrict__ qpos,
        float * __restrict__ part_m, float * __restrict__ part_l,
        const int C, const int T, const int G, const float scale) {
#if defined(HH_PF_AVAILABLE)
    const int j = blockIdx.y, n = gridDim.y, z = blockIdx.z, ns = gridDim.z;
    const int r0 = blockIdx.x*HH_PF_TILE, R = G*T, RP = gridDim.x*HH_PF_TILE;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, tig = lane % 4;
    const int nt = ((C + HH_PF_TILE - 1)/HH_PF_TILE - z + ns - 1)/ns;

    extern __shared__ __align__(128) char smem_pf[];
    half  * k_s = (half *) smem_pf;                  // [2][64][D]
    float * p_s = (float *) (k_s + 2*HH_PF_TILE*D);  // [2][64]
    __shared__ float qp_r[HH_PF_TILE];
    __shared__ unsigned char seen[HH_PF_MAX_TILES];
    __shared__ uint16_t list[HH_PF_MAX_TILES];

    const half  * Kj = K + (int64_t) j*C*D;
    const float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    uint32_t qa[D/16][4];
    const int n_seen = hh_pf_begin<D>(qa, k_s + HH_PF_TILE*D, qp_r, seen, list, q, q_nb1, q_nb2, qpos, Pj, j, r0, R, G, C, z, ns, nt);
    const int ra = 16*warp + lane/4; // this thread's rows: ra and ra + 8
    const float qp[2] = { qp_r[ra], qp_r[ra + 8] };
    float m[2] = { -INFINITY, -INFINITY }, l[2] = { 0.0f, 0.0f }; // over this thread's cells

    if (n_seen > 0) {
        hh_pf_load_tile<D, 0>(k_s, nullptr, p_s, Kj, nullptr, Pj, (z + list[0]*ns)*HH_PF_TILE, C);
    }
    for (int i = 0; i < n_seen; ++i) {
        const int bf = i % 2;
        cp_async_wait_all();
        __syncthreads(); // tile i is here; every warp is done with tile i - 1, whose buffer takes tile i + 1
        if (i + 1 < n_seen) {
            hh_pf_load_tile<D, 0>(k_s + (1 - bf)*HH_PF_TILE*D, nullptr, p_s + (1 - bf)*HH_PF_TILE, Kj, nullptr, Pj,
                (z + list[i + 1]*ns)*HH_PF_TILE, C);
        }
        float s[HH_PF_TILE/8][4];
        hh_pf_logits<D>(s, qa, k_s + bf*HH_PF_TILE*D, scale*HH_PF_LOG2E);
        const float * pc = p_s + bf*HH_PF_TILE;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mt = -INFINITY;
#pragma unroll
            for (int b = 0; b < HH_PF_TILE/8; ++b) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float & x = s[b][2*h + e];
                    x = qp[h] - pc[8*b + 2*tig + e] > 0.0f ? x : -INFINITY;
                    mt = fmaxf(mt, x);
                }
            }
            const float mn = fmaxf(m[h], mt);
            if (mn == -INFINITY) {
                continue; // nothing of the tile seen by this row yet
            }
            float sum = 0.0f;
#pragma unroll
            for (int b = 0; b < HH_PF_TILE/8; ++b) {
                sum += exp2f(s[b][2*h] - mn) + exp2f(s[b][2*h + 1] - mn);
            }
            l[h] = (m[h] == -INFINITY ? 0.0f : l[h]*exp2f(m[h] - mn)) + sum;
            m[h] = mn;
        }
    }
    // the 4 lanes of a row merge their statistics
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int off = 1; off < 4; off *= 2) {
            const float mo = __shfl_xor_sync(0xffffffff, m[h], off), lo = __shfl_xor_sync(0xffffffff, l[h], off);
            const float mn = fmaxf(m[h], mo);
            if (mn != -INFINITY) {
                l[h] = (m[h] == -INFINITY ? 0.0f : l[h]*exp2f(m[h] - mn)) + (mo == -INFINITY ? 0.0f : lo*exp2f(mo - mn));
            }
            m[h] = mn;
        }
        if (tig == 0) {
            const int64_t pr = ((int64_t) z*n + j)*RP + r0 + ra + 8*h;
            part_m[pr] = m[h];
            part_l[pr] = l[h];
        }
    }
#else
    GGML_UNUSED_VARS(q, q_nb1, q_nb2, K, P, qpos, part_m, part_l, C, T, G, scale);
    NO_DEVICE_CODE;
#endif // defined(HH_PF_AVAILABLE)
}

// Pass 2, block (row tile, head j, split z): the rows' statistics merged from pass 1's splits, then the
// same logits again over the seen cell tiles z, z + ns, ..., now as final probabilities p = exp(l - m)/sum,
// all in registers:
//  - their sums over the block's rows, per cell: part_c[row tile][j][C] (hh_pf_scores adds the row tiles
//    into the scores; cells of tiles nobody in the block sees get 0), the column sums flash attention
//    never forms;
//  - the output rows += p V on tensor cores (p's C fragments are A fragments of the next product; no
//    rescaling, the probabilities are final): into dst when ns == 1, else into part_o[z] for hh_pf_merge.
//  Two blocks per SM: 225 registers (sm_90, D = 128) and no spills, where three spilled; at 8B shape and
//  ubatch 512 a layer launches about 256 blocks, fewer than two per SM anyway.
template <int D>
static __global__ void __launch_bounds__(HH_PF_WARPS*WARP_SIZE, 2) hh_pf_out(
        const char * __restrict__ q, const int64_t q_nb1, const int64_t q_nb2,
        const half * __restrict__ K, const half * __restrict__ V, const float * __restrict__ P,
        const float * __restrict__ qpos, const float * __restrict__ part_m, const float * __restrict__ part_l, const int ns_m,
        float * __restrict__ dst, float * __restrict__ part_o, float * __restrict__ part_c,
        const int C, const int T, const int G, const float scale) {
#if defined(HH_PF_AVAILABLE)
    constexpr int Dv = D;
    const int j = blockIdx.y, n = gridDim.y, z = blockIdx.z, ns = gridDim.z, rt = blockIdx.x;
    const int r0 = rt*HH_PF_TILE, R = G*T, RP = gridDim.x*HH_PF_TILE;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, tig = lane % 4;
    const int nt = ((C + HH_PF_TILE - 1)/HH_PF_TILE - z + ns - 1)/ns;

    extern __shared__ __align__(128) char smem_pf[];
    half  * k_s = (half *) smem_pf;                   // [2][64][D]
    half  * v_s = k_s + 2*HH_PF_TILE*D;               // [2][Dv][64]
    float * p_s = (float *) (v_s + 2*Dv*HH_PF_TILE);  // [2][64]
    __shared__ float qp_r[HH_PF_TILE], m_r[HH_PF_TILE], il_r[HH_PF_TILE];
    __shared__ __align__(16) float cs_s[2][HH_PF_WARPS][HH_PF_TILE]; // each warp's column sums of a tile
    __shared__ unsigned char seen[HH_PF_MAX_TILES];
    __shared__ uint16_t list[HH_PF_MAX_TILES];

    if (threadIdx.x < HH_PF_TILE) {
        const int r = r0 + threadIdx.x;
        float m = -INFINITY, l = 0.0f;
        for (int s = 0; s < ns_m; ++s) {
            m = fmaxf(m, part_m[((int64_t) s*n + j)*RP + r]);
        }
        for (int s = 0; s < ns_m; ++s) {
            const float ms = part_m[((int64_t) s*n + j)*RP + r];
            l += ms == -INFINITY ? 0.0f : exp2f(ms - m)*part_l[((int64_t) s*n + j)*RP + r];
        }
        m_r[threadIdx.x]  = m;
        il_r[threadIdx.x] = l > 0.0f ? 1.0f/l : 0.0f;
    }
    const half  * Kj = K + (int64_t) j*C*D;
    const half  * Vj = V + (int64_t) j*C*Dv;
    const float * Pj = P + (int64_t) j*(C + GGML_FASTGEN_HH_P_PAD);
    uint32_t qa[D/16][4];
    const int n_seen = hh_pf_begin<D>(qa, k_s + HH_PF_TILE*D, qp_r, seen, list, q, q_nb1, q_nb2, qpos, Pj, j, r0, R, G, C, z, ns, nt);

    float * cs = part_c + ((int64_t) rt*n + j)*C;
    for (int i = threadIdx.x; i < nt*HH_PF_TILE; i += blockDim.x) { // tiles nobody in the block sees
        const int k = i / HH_PF_TILE, c = (z + k*ns)*HH_PF_TILE + i % HH_PF_TILE;
        if (!seen[k] && c < C) {
            cs[c] = 0.0f;
        }
    }
    const int ra = 16*warp + lane/4; // this thread's rows: ra and ra + 8
    const float qp[2] = { qp_r[ra], qp_r[ra + 8] }, m[2] = { m_r[ra], m_r[ra + 8] }, il[2] = { il_r[ra], il_r[ra + 8] };
    float o[Dv/8][4];
#pragma unroll
    for (int b = 0; b < Dv/8; ++b) {
        o[b][0] = o[b][1] = o[b][2] = o[b][3] = 0.0f;
    }

    if (n_seen > 0) {
        hh_pf_load_tile<D, Dv>(k_s, v_s, p_s, Kj, Vj, Pj, (z + list[0]*ns)*HH_PF_TILE, C);
    }
    for (int i = 0; i < n_seen; ++i) {
        const int bf = i % 2;
        cp_async_wait_all();
        __syncthreads(); // tile i is here; every warp is done with tile i - 1, whose buffer takes tile i + 1
        if (i > 0 && threadIdx.x < HH_PF_TILE) { // tile i - 1's column sums, added over the warps
            const int c = (z + list[i - 1]*ns)*HH_PF_TILE + threadIdx.x;
            if (c < C) {
                cs[c] = cs_s[1 - bf][0][threadIdx.x] + cs_s[1 - bf][1][threadIdx.x] + cs_s[1 - bf][2][threadIdx.x] + cs_s[1 - bf][3][threadIdx.x];
            }
        }
        if (i + 1 < n_seen) {
            hh_pf_load_tile<D, Dv>(k_s + (1 - bf)*HH_PF_TILE*D, v_s + (1 - bf)*Dv*HH_PF_TILE, p_s + (1 - bf)*HH_PF_TILE,
                Kj, Vj, Pj, (z + list[i + 1]*ns)*HH_PF_TILE, C);
        }
        float s[HH_PF_TILE/8][4];
        hh_pf_logits<D>(s, qa, k_s + bf*HH_PF_TILE*D, scale*HH_PF_LOG2E);
        const float * pc = p_s + bf*HH_PF_TILE;

        uint32_t pa[HH_PF_TILE/16][4]; // the probabilities as A fragments of p V: cells 16 k .. 16 k + 15
        float v[HH_PF_TILE/4]; // the warp's 16 rows summed, per cell: v[2 b + e] is cell 8 b + 2 tig + e
#pragma unroll
        for (int b = 0; b < HH_PF_TILE/8; ++b) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pce = pc[8*b + 2*tig + e];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float & x = s[b][2*h + e];
                    x = qp[h] - pce > 0.0f ? exp2f(x - m[h])*il[h] : 0.0f;
                }
                v[2*b + e] = s[b][e] + s[b][2 + e];
            }
            const half2 lo = __floats2half2_rn(s[b][0], s[b][1]), hi = __floats2half2_rn(s[b][2], s[b][3]);
            pa[b/2][2*(b % 2) + 0] = *(const uint32_t *) &lo;
            pa[b/2][2*(b % 2) + 1] = *(const uint32_t *) &hi;
        }
        // no masks on V: a free cell's V is a row once written (the store's buffer starts cleared), and
        // its probability is 0
#pragma unroll
        for (int k = 0; k < HH_PF_TILE/16; ++k) {
#pragma unroll
            for (int b = 0; b < Dv/16; ++b) { // B fragments of output columns 16 b .. 16 b + 15: V rows, as stored
                uint32_t vb[4];
                hh_ldmatrix_x4(vb, v_s + bf*Dv*HH_PF_TILE + hh_pf_swz(16*b + lane % 8 + 8*(lane/16), 2*k + (lane/8) % 2, HH_PF_TILE));
                hh_mma(o[2*b + 0], pa[k], vb[0], vb[1]);
                hh_mma(o[2*b + 1], pa[k], vb[2], vb[3]);
            }
        }
        // then over the warp: a reduce-scatter over the 8 lanes of a cell (lane bits 4, 3, 2), each step
        // sending half of what is left; a lane ends with cells 2 lane + {0, 1}
        const auto step = [&](const int w) { // lane bit 4 (w = 8), 3, 2
            const bool up = lane & (2*w);
#pragma unroll
            for (int k = 0; k < w; ++k) {
                const float send = up ? v[k] : v[k + w], keep = up ? v[k + w] : v[k];
                v[k] = keep + __shfl_xor_sync(0xffffffff, send, 2*w);
            }
        };
        step(8); step(4); step(2);
        *(float2 *) &cs_s[bf][warp][2*lane] = make_float2(v[0], v[1]);
    }
    __syncthreads();
    if (n_seen > 0 && threadIdx.x < HH_PF_TILE) { // the last tile's column sums
        const int bf = (n_seen - 1) % 2, c = (z + list[n_seen - 1]*ns)*HH_PF_TILE + threadIdx.x;
        if (c < C) {
            cs[c] = cs_s[bf][0][threadIdx.x] + cs_s[bf][1][threadIdx.x] + cs_s[bf][2][threadIdx.x] + cs_s[bf][3][threadIdx.x];
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + ra + 8*h;
        if (r >= R) {
            continue;
        }
        float * out = ns == 1 ? dst + (int64_t) (r / G)*Dv*G*n + ((int64_t) j*G + r % G)*Dv
                              : part_o + (((int64_t) z*n + j)*RP + r)*Dv;
#pragma unroll
        for (int b = 0; b < Dv/8; ++b) {
            *(float2 *) (out + 8*b + 2*tig) = make_float2(o[b][2*h], o[b][2*h + 1]);
        }
    }
#else
    GGML_UNUSED_VARS(q, q_nb1, q_nb2, K, V, P, qpos, part_m, part_l, ns_m, dst, part_o, part_c, C, T, G, scale);
    NO_DEVICE_CODE;
#endif // defined(HH_PF_AVAILABLE)
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

static bool hh_pf_d_built(int64_t D) {
#define HH_PF_D_IS(D_) D == D_ ||
    return HH_PF_D_CASES(HH_PF_D_IS) false;
#undef HH_PF_D_IS
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
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(op);
    const ggml_tensor * U = a.U;
    if (ggml_fastgen_hh_decode(&a)) { // decode kernel: it also keeps each token's scores
        return !U || (U->type == GGML_TYPE_F32 && U->ne[0] == K->ne[1] && U->ne[1] == n && U->nb[1] == U->ne[0]*sizeof(float));
    }
    if (U) {
        return false; // the prefill kernels do not keep each token's scores
    }
    // prefill kernels: tensor cores and asynchronous copies (Ampere and newer), kernels built for the head
    // size (K and V alike), and the tiles' shared memory (70 KB at head size 128: three blocks per SM on
    // H100/H200, two on A100; GPUs with 99 KB per block, e.g. consumer Ampere, fit it too)
    const ggml_cuda_device_info::cuda_device_info & info = ggml_cuda_info().devices[device];
    const size_t smem = hh_pf_smem(K->ne[0], V->ne[1]) + HH_PF_STATIC_SMEM;
    return ampere_mma_available(info.cc) && cp_async_available(info.cc) && K->ne[0] == V->ne[1] && hh_pf_d_built(K->ne[0]) &&
           smem <= info.smpbo;
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

    // both passes split the cells when a layer has too few (row tile, head) blocks to fill the GPU (two
    // per SM): the fewest splits whose waves x tiles per block is least, and only when that saves more
    // than a quarter (the splits' outputs then take one more launch to add up). At most HH_PF_MAX_SPLIT:
    // every split writes its own output rows for the merge, which the wave count does not see (8B shape,
    // pp8192 at ubatch 512 on the H200: splits of up to 16 on the layers with few heavy-hitter heads ran at
    // 9,361 tok/s, never splitting at 10,027, splitting every layer in 4 at 10,023)
    const int slots = 2*ggml_cuda_info().devices[ctx.device].nsm; // hh_pf_out's bound
    const int row_tiles = RP/HH_PF_TILE, cell_tiles = (C + HH_PF_TILE - 1)/HH_PF_TILE;
    const auto cost = [&](int s) { return (int64_t) ((row_tiles*n*s + slots - 1)/slots) * ((cell_tiles + s - 1)/s); };
    int ns = 1;
    for (int s = 2; s <= std::min(cell_tiles, HH_PF_MAX_SPLIT); ++s) {
        ns = cost(s) < cost(ns) ? s : ns;
    }
    ns = 4*cost(ns) < 3*cost(1) ? ns : 1;

    ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) ns*n*RP);
    ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) ns*n*RP);
    ggml_cuda_pool_alloc<float> part_o(ctx.pool(), ns > 1 ? (size_t) ns*n*RP*Dv : 1);
    ggml_cuda_pool_alloc<float> part_c(ctx.pool(), (size_t) row_tiles*n*C);

    hh_pf_write<<<dim3(T, n), 128, 0, stream>>>(
        (const char *) a.k_cur->data, a.k_cur->nb[1], a.k_cur->nb[2], (const char *) a.v_cur->data, a.v_cur->nb[1], a.v_cur->nb[2],
        (const int64_t *) a.idxs->data, a.idxs->nb[1]/sizeof(int64_t), a.h0, K, V, S, P, qpos, D, Dv, C);

    const dim3 grid(row_tiles, n, ns), block(HH_PF_WARPS*WARP_SIZE);
#define HH_PF_CASE(D_) case D_: { \
        static size_t raised_stats[GGML_CUDA_MAX_DEVICES] = {}, raised_out[GGML_CUDA_MAX_DEVICES] = {}; \
        hh_pf_smem_limit((const void *) hh_pf_stats<D_>, raised_stats[ctx.device], hh_pf_smem(D, 0)); \
        hh_pf_stats<D_><<<grid, block, hh_pf_smem(D, 0), stream>>>((const char *) a.q->data, a.q->nb[1], a.q->nb[2], \
            K, P, qpos, part_m.get(), part_l.get(), C, T, G, a.scale); \
        hh_pf_smem_limit((const void *) hh_pf_out<D_>, raised_out[ctx.device], hh_pf_smem(D, Dv)); \
        hh_pf_out<D_><<<grid, block, hh_pf_smem(D, Dv), stream>>>((const char *) a.q->data, a.q->nb[1], a.q->nb[2], \
            K, V, P, qpos, part_m.get(), part_l.get(), ns, (float *) dst->data, part_o.get(), part_c.get(), C, T, G, a.scale); \
        } break;
    switch (D) {
        HH_PF_D_CASES(HH_PF_CASE)
        default: GGML_ABORT("fastgen: head size %d not supported by the prefill kernels", D);
    }
#undef HH_PF_CASE
    if (ns > 1) {
        hh_pf_merge<<<dim3(R, n), 128, 0, stream>>>(part_o.get(), (float *) dst->data, Dv, G, RP, ns);
    }
    hh_pf_scores<<<dim3((C + 255)/256, n), 256, 0, stream>>>(part_c.get(), P, S, C, row_tiles);
    CUDA_CHECK(cudaGetLastError());
}

int ggml_cuda_fastgen_env_switch(const char * name, int unset, bool allow_2, const char * unset_means) {
    const char * e = getenv(name);
    if (!e || !*e) {
        return unset;
    }
    if (allow_2 && strcmp(e, "2") == 0) {
        return 2;
    }
    const int w = llama_fastgen_env_word(e);
    if (w < 0) {
        GGML_LOG_WARN("llama-fastgen: %s=%s is not %s" LLAMA_FASTGEN_ENV_WORDS ": %s, the default\n", name, e,
                      allow_2 ? "2 or " : "", unset_means);
        return unset;
    }
    return w;
}

// KV cells from which a marked attention (ggml-fastgen.h) takes the MMA kernel (H100, session 33: the full cache's two
// kernels cross between 4,096 and 8,192 cells, and at depth 0 the vector kernel was faster for both caches; llama.cpp's
// own rule for GQA > 4 switches at 8,192 too). Here, not in ggml-fastgen.h, which every ggml-cuda file includes.
#define GGML_FASTGEN_FA_MMA_MIN_KV 8192
bool ggml_cuda_fastgen_fa_mma(const ggml_tensor * dst) {
    // =0: llama.cpp's own choice for every attention (a diagnostic: bench_gpu.py's 'diag fastgen fa-vec')
    static const bool on = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_FA_MMA", 1, false, "on") != 0;
    return on && ggml_fastgen_marked(dst, GGML_OP_FLASH_ATTN_EXT, GGML_FASTGEN_MARK_FA) && dst->src[1]->ne[1] >= GGML_FASTGEN_FA_MMA_MIN_KV;
}

// Whether the merge may have every block of a head wait for the others: only if all n*ns blocks of the
// launch are resident at once (else a waiting block could hold the SM a missing one needs), and its shared memory,
// with the kernel's static, stays within the 48 KB a launch gets without raising its limit.
#define HH_COOP_MAX_SMEM (48*1024)
static bool hh_coop_fits(const void * fn, int device, size_t smem, int blocks) {
    thread_local std::map<std::pair<const void *, size_t>, int> per_sm; // occupancy per kernel and shared memory (-1: too much)
    auto it = per_sm.find({ fn, smem });
    if (it == per_sm.end()) {
        cudaFuncAttributes attr;
        CUDA_CHECK(cudaFuncGetAttributes(&attr, fn));
        int n = -1;
        if (smem + attr.sharedSizeBytes <= HH_COOP_MAX_SMEM) {
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, HH_WARPS*WARP_SIZE, smem));
        }
        it = per_sm.emplace(std::make_pair(fn, smem), n).first;
    }
    return it->second >= 0 && blocks <= it->second*ggml_cuda_info().devices[device].nsm;
}

void ggml_cuda_fastgen_hh_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    GGML_ASSERT(ggml_cuda_fastgen_hh_attn_supported(ctx.device, dst));
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    if (!ggml_fastgen_hh_decode(&a)) {
        hh_prefill(ctx, a, dst);
        return;
    }
    const ggml_tensor * q = a.q, * kc = a.k_cur, * vc = a.v_cur, * idxs = a.idxs, * qpos = a.query_pos;
    ggml_tensor * K = a.K, * V = a.V, * S = a.S, * P = a.P;
    const int h0 = a.h0;
    const int D = a.D, C = a.C, n = a.n, Dv = a.Dv, T = a.T, G = a.G, R = G*T;
    const int ns = (C + HH_CHUNK - 1)/HH_CHUNK, RB = R <= 4 ? 4 : 8, RP = (R + RB - 1)/RB*RB;
    const float scale = a.scale;

    // programmatic dependent launch unless LLAMA_FASTGEN_CUDA_PDL=0 (a diagnostic: bench_gpu.py's
    // 'diag fastgen no-pdl'); ggml_cuda_kernel_launch also obeys llama.cpp's GGML_CUDA_PDL=0
    static const bool pdl = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_PDL", 1, false, "on") != 0;
    // a new token's K row read as float4s before it is stored, where its rows are 16-byte aligned; =0 (a diagnostic:
    // 'diag fastgen no-kbatch') keeps the loop that interleaves loads and stores
    static const bool kbatch_on = ggml_cuda_fastgen_env_switch("LLAMA_FASTGEN_CUDA_KBATCH", 1, false, "on") != 0;
    const bool kbatch = kbatch_on && (uintptr_t) kc->data % 16 == 0 && kc->nb[1] % 16 == 0 && kc->nb[2] % 16 == 0;
    const dim3 grid(n, ns), block(HH_WARPS*WARP_SIZE);
    // as hh_attn lays it out: queries, weights, the second part's output sums; coop: + the chunk's logits,
    // the chunks' weights
    const size_t smem_chunk = (size_t) (R*D + RP*HH_CHUNK + (2*Dv <= HH_WARPS*WARP_SIZE ? 2*RB*Dv : 0))*sizeof(float);
    const size_t smem_coop  = smem_chunk + (size_t) (R*HH_CHUNK + ns*R)*sizeof(float);
    auto launch = [&](auto kernel) {
        // every block of a head merges when all blocks of the launch fit on the device at once; else the last
        // one merges, from the logits kept in a scratch buffer (the only path that needs it)
        const bool coop = hh_coop_fits((const void *) kernel, ctx.device, smem_coop, n*ns);
        const size_t smem = coop ? smem_coop : std::max(smem_chunk, (size_t) ns*R*sizeof(float));
        ggml_cuda_pool_alloc<float> logits(ctx.pool(), coop ? 1 : (size_t) n*R*C);
        ggml_cuda_pool_alloc<float> part_m(ctx.pool(), (size_t) n*ns*R);
        ggml_cuda_pool_alloc<float> part_l(ctx.pool(), (size_t) n*ns*R);
        ggml_cuda_pool_alloc<float> part_o(ctx.pool(), (size_t) n*ns*R*Dv);
        const auto args = std::make_tuple(
            (const char *) q->data, q->nb[1], q->nb[2], (const char *) kc->data, kc->nb[1], kc->nb[2],
            (const char *) vc->data, vc->nb[1], vc->nb[2], (const int64_t *) idxs->data, idxs->nb[1]/sizeof(int64_t), h0,
            (half *) K->data, (half *) V->data, (float *) S->data, (float *) P->data, (const float *) qpos->data,
            ggml_cuda_fastgen_hh_out(ctx, dst), logits.get(), part_m.get(), part_l.get(), part_o.get(),
            a.U ? (float *) a.U->data : nullptr, a.U ? a.U->nb[2]/(int64_t) sizeof(float) : 0, a.U ? (int) a.U->ne[2] : 1,
            Dv, C, T, G, scale, coop, pdl, kbatch);
        std::apply([&](const auto &... x) {
            if (pdl) {
                ggml_cuda_kernel_launch(kernel, ggml_cuda_kernel_launch_params(grid, block, smem, ctx.stream()), x...);
            } else {
                kernel<<<grid, block, smem, ctx.stream()>>>(x...);
            }
        }, args);
    };
#define HH_CASE(DL) case DL: if (RB == 4) { launch(hh_attn<DL, 4>); } else { launch(hh_attn<DL, 8>); } break
    switch (D / WARP_SIZE) {
        HH_CASE(1); HH_CASE(2); HH_CASE(3); HH_CASE(4); HH_CASE(5); HH_CASE(6); HH_CASE(7); HH_CASE(8);
        default: GGML_ABORT("fastgen: head size %d not supported", D);
    }
#undef HH_CASE
    CUDA_CHECK(cudaGetLastError());
}
