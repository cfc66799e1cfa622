// llama-fastgen: CPU implementation of GGML_OP_FASTGEN_HH_ATTN (see ggml-fastgen.h), compiled into
// ggml-cpu, with ggml-cpu's SIMD conversions and vector macros. It is the reference of the CUDA kernel.
// Decode-sized ubatches split heads over the threads; longer ones (prefill) split query rows, in
// blocks that keep their logits in L1, instead of the composed path's [cells x rows] matrices per
// head, which went through memory three times (2.6x the flash attention of the full cache, perf).
#include "ggml-fastgen.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "simd-mappings.h"
#include "vec.h"

#include <cmath>
#include <cstring>
#include <vector>

// decode: heads over the threads, no barrier (a few query rows per head)
static void hh_attn_heads(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    const ggml_tensor * q = a.q, * kc = a.k_cur, * vc = a.v_cur, * idxs = a.idxs, * qpos = a.query_pos;
    ggml_tensor * K = a.K, * V = a.V, * S = a.S, * P = a.P;
    const int64_t D = a.D, C = a.C, n = a.n, Dv = a.Dv, T = a.T, G = a.G, h0 = a.h0;
    const float scale = a.scale;
    GGML_ASSERT(h0 >= 0 && h0 + n <= idxs->ne[1] && ggml_is_contiguous(qpos));

    // per-thread f32 copies of one head's K rows and V columns: converted once per head with ggml-cpu's
    // SIMD conversion, then every query row of the group and ubatch reads them through SIMD dots
    // (a scalar fp16 conversion per cell and query row was 45% of a 2K SmolLM2 decode under perf)
    thread_local std::vector<float> kf, vf, logit, colsum, out;
    thread_local std::vector<uint32_t> occupied;
    thread_local std::vector<uint8_t> keep;
    kf.resize(C*D); vf.resize(Dv*C); logit.resize(C); colsum.resize(C); out.resize(Dv); occupied.resize(C); keep.resize(C);
    for (int64_t j = params->ith; j < n; j += params->nth) {
        ggml_fp16_t * Kj = (ggml_fp16_t *) ((char *) K->data + j*K->nb[2]);
        ggml_fp16_t * Vj = (ggml_fp16_t *) ((char *) V->data + j*V->nb[2]);
        float       * cp = (float *) ((char *) P->data + j*P->nb[1]);

        // 1. the new tokens' K, V and positions into their cells; a new or free cell's score restarts
        for (int64_t c = 0; c < C; ++c) {
            keep[c] = !std::isinf(cp[c]);
        }
        for (int64_t t = 0; t < T; ++t) {
            const int64_t c = ((const int64_t *) ((const char *) idxs->data + (h0 + j)*idxs->nb[1]))[t];
            GGML_ASSERT(c >= 0 && c < C);
            cp[c]   = ((const float *) qpos->data)[t] - 0.5f;
            keep[c] = 0;
            ggml_cpu_fp32_to_fp16((const float *) ((const char *) kc->data + j*kc->nb[1] + t*kc->nb[2]), Kj + c*D, D);
            const float * vr = (const float *) ((const char *) vc->data + j*vc->nb[1] + t*vc->nb[2]);
            for (int64_t d = 0; d < Dv; ++d) {
                Vj[c + d*C] = GGML_CPU_FP32_TO_FP16(vr[d]);
            }
        }

        // 2. f32 copies of the occupied range [lo, hi) (a store fills its cells from the front, so the
        //    free ones are mostly behind it): K rows of occupied cells; V columns with free cells zeroed
        //    by a bit mask, row by row (p = 0 there, but 0 * a stale NaN would still be NaN; ubatch-sized
        //    gaps of evicted cells lie all through the range)
        int64_t lo = 0, hi = C;
        while (lo < hi && std::isinf(cp[lo])) {
            ++lo;
        }
        while (hi > lo && std::isinf(cp[hi - 1])) {
            --hi;
        }
        const int64_t W = hi - lo;
        for (int64_t c = lo; c < hi; ++c) {
            const bool used = !std::isinf(cp[c]);
            occupied[c - lo] = used ? ~0u : 0u;
            if (used) {
                ggml_cpu_fp16_to_fp32(Kj + c*D, kf.data() + c*D, D);
            }
        }
        for (int64_t d = 0; d < Dv; ++d) {
            float * row = vf.data() + d*C + lo;
            ggml_cpu_fp16_to_fp32(Vj + d*C + lo, row, W);
            uint32_t * bits = (uint32_t *) row;
            for (int64_t i = 0; i < W; ++i) {
                bits[i] &= occupied[i];
            }
        }

        // 3. softmax over the visible cells, output, column sums (and each token's own, when recorded)
        std::fill(colsum.begin(), colsum.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
            const float qp = ((const float *) qpos->data)[t];
            float * u = nullptr;
            if (a.U) {
                const int64_t slot = (int64_t) qp % a.U->ne[2];
                u = (float *) ((char *) a.U->data + j*a.U->nb[1] + slot*a.U->nb[2]);
                std::fill(u, u + C, 0.0f);
            }
            for (int64_t g = 0; g < G; ++g) {
                const float * qr = (const float *) ((const char *) q->data + (j*G + g)*q->nb[1] + t*q->nb[2]);
                float * lg = logit.data() + lo;
                float m = -INFINITY;
                for (int64_t c = lo; c < hi; ++c) {
                    lg[c - lo] = -INFINITY;
                    if (qp - cp[c] > 0.0f) {
                        float dot;
                        ggml_vec_dot_f32((int) D, &dot, 0, kf.data() + c*D, 0, qr, 0, 1);
                        lg[c - lo] = scale*dot;
                        m = std::max(m, lg[c - lo]);
                    }
                }
                double sum = 0.0;
                for (int64_t i = 0; i < W; ++i) {
                    lg[i] = lg[i] == -INFINITY ? 0.0f : std::exp(lg[i] - m);
                    sum += lg[i];
                }
                const float inv = sum > 0.0 ? (float) (1.0/sum) : 0.0f;
                ggml_vec_scale_f32((int) W, lg, inv);
                ggml_vec_acc_f32((int) W, colsum.data() + lo, lg);
                if (u) {
                    ggml_vec_acc_f32((int) W, u + lo, lg);
                }
                for (int64_t d = 0; d < Dv; ++d) {
                    ggml_vec_dot_f32((int) W, &out[d], 0, vf.data() + d*C + lo, 0, lg, 0, 1);
                }
                std::memcpy((char *) dst->data + t*dst->nb[1] + (j*G + g)*Dv*sizeof(float), out.data(), Dv*sizeof(float));
            }
        }

        // 4. accumulated attention: reset for free or reused cells, then add this ubatch's
        float * s = (float *) ((char *) S->data + j*S->nb[1]);
        for (int64_t c = 0; c < C; ++c) {
            s[c] = keep[c] ? s[c] + colsum[c] : colsum[c]; // a select: a NaN left in a free cell dies here
        }
    }
}

size_t ggml_fastgen_hh_attn_work_size(const ggml_tensor * op, int n_tasks) {
    const ggml_tensor * K = op->src[GGML_FASTGEN_HH_K];
    return sizeof(float) * (size_t) n_tasks * (size_t) (K->ne[1] * K->ne[2]); // column sums per thread
}

#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && !defined(__riscv_v_intrinsic)
#define HH_EPR             GGML_F32_EPR
#define HH_VEC             GGML_F32_VEC
#define HH_ZERO            GGML_F32_VEC_ZERO
#define HH_SET1(x)         GGML_F32_VEC_SET1(x)
#define HH_LOAD(p)         GGML_F32_VEC_LOAD(p)
#define HH_STORE(p, v)     GGML_F32_VEC_STORE(p, v)
#define HH_FMA(a, b, c)    GGML_F32_VEC_FMA(a, b, c)
#else // no fixed-width vectors: the same loops on scalars
#define HH_EPR             1
#define HH_VEC             float
#define HH_ZERO            0.0f
#define HH_SET1(x)         (x)
#define HH_LOAD(p)         (*(p))
#define HH_STORE(p, v)     (*(p) = (v))
#define HH_FMA(a, b, c)    ((a) + (b)*(c))
#endif

static constexpr int64_t HH_RB = 4;        // query rows per block
static constexpr int64_t HH_TC = 2*HH_EPR; // cells per logit tile

// L[r][i] = sum_d Q[r][d] * Kt[d][i] for HH_RB rows and i < Wp (a multiple of HH_TC): K transposed,
// so each row's logits are vector FMAs with a broadcast query element, no horizontal sums
static void hh_logits(int64_t D, int64_t Wp, const float * Q, const float * Kt, float * L) {
    for (int64_t i = 0; i < Wp; i += HH_TC) {
        HH_VEC acc[HH_RB][2];
        for (int64_t r = 0; r < HH_RB; ++r) {
            acc[r][0] = HH_ZERO;
            acc[r][1] = HH_ZERO;
        }
        for (int64_t d = 0; d < D; ++d) {
            const HH_VEC k0 = HH_LOAD(Kt + d*Wp + i);
            const HH_VEC k1 = HH_LOAD(Kt + d*Wp + i + HH_EPR);
            for (int64_t r = 0; r < HH_RB; ++r) {
                const HH_VEC q = HH_SET1(Q[r*D + d]);
                acc[r][0] = HH_FMA(acc[r][0], k0, q);
                acc[r][1] = HH_FMA(acc[r][1], k1, q);
            }
        }
        for (int64_t r = 0; r < HH_RB; ++r) {
            HH_STORE(L + r*Wp + i, acc[r][0]);
            HH_STORE(L + r*Wp + i + HH_EPR, acc[r][1]);
        }
    }
}

// O[r][d] = sum_i P[r][i] * Vf[d][i] for HH_RB rows, two output columns at a time
static void hh_output(int64_t Dv, int64_t Wp, const float * P, const float * Vf, float * O) {
    for (int64_t d = 0; d < Dv; d += 2) {
        HH_VEC acc[HH_RB][2];
        for (int64_t r = 0; r < HH_RB; ++r) {
            acc[r][0] = HH_ZERO;
            acc[r][1] = HH_ZERO;
        }
        for (int64_t i = 0; i < Wp; i += HH_EPR) {
            const HH_VEC v0 = HH_LOAD(Vf + d*Wp + i);
            const HH_VEC v1 = HH_LOAD(Vf + (d + 1)*Wp + i);
            for (int64_t r = 0; r < HH_RB; ++r) {
                const HH_VEC p = HH_LOAD(P + r*Wp + i);
                acc[r][0] = HH_FMA(acc[r][0], v0, p);
                acc[r][1] = HH_FMA(acc[r][1], v1, p);
            }
        }
        for (int64_t r = 0; r < HH_RB; ++r) {
            for (int e = 0; e < 2; ++e) {
                float lanes[HH_EPR];
                HH_STORE(lanes, acc[r][e]);
                float sum = 0.0f;
                for (int l = 0; l < HH_EPR; ++l) {
                    sum += lanes[l];
                }
                O[r*Dv + d + e] = sum;
            }
        }
    }
}

// max of x[0, n): eight independent lanes, which the compiler vectorizes (ggml_vec_max_f32 is one chain)
static float hh_max(int64_t n, const float * x) {
    float m[8] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int e = 0; e < 8; ++e) {
            m[e] = x[i + e] > m[e] ? x[i + e] : m[e];
        }
    }
    for (; i < n; ++i) {
        m[0] = x[i] > m[0] ? x[i] : m[0];
    }
    float r = m[0];
    for (int e = 1; e < 8; ++e) {
        r = m[e] > r ? m[e] : r;
    }
    return r;
}

// prefill: query rows (token t, group g: r = t*G + g) in blocks over the threads, one head after the
// other. Every thread converts the head's cells to f32 itself (cheap beside the rows) with the ubatch's
// new tokens taken from k_cur / v_cur rounded as the store will hold them, so nothing is written to the
// store until every thread has read it: after a barrier, heads over threads write the new cells, their
// positions and the scores (the threads' column sums, from the work buffer, added up).
static void hh_attn_rows(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    const ggml_tensor * q = a.q, * kc = a.k_cur, * vc = a.v_cur, * idxs = a.idxs;
    ggml_tensor * K = a.K, * V = a.V, * S = a.S, * P = a.P;
    const float * qpos = (const float *) a.query_pos->data;
    const int64_t D = a.D, C = a.C, n = a.n, Dv = a.Dv, T = a.T, G = a.G, R = T*G, h0 = a.h0;
    const float scale = a.scale;
    GGML_ASSERT(h0 >= 0 && h0 + n <= idxs->ne[1] && Dv % 2 == 0 && D <= GGML_FASTGEN_HH_MAX_D);
    GGML_ASSERT(params->wsize >= ggml_fastgen_hh_attn_work_size(dst, params->nth));
    auto slots_of = [&](int64_t j) {
        return (const int64_t *) ((const char *) idxs->data + (h0 + j)*idxs->nb[1]);
    };

    thread_local std::vector<float> kt, vf, lg, qb, ob, pe, bias;
    thread_local std::vector<int32_t> src; // ubatch token of a cell, -1 for cells held before it
    pe.resize(C); src.resize(C);
    qb.resize(HH_RB*D); ob.resize(HH_RB*Dv);
    float * parts = (float *) params->wdata;

    for (int64_t j = 0; j < n; ++j) {
        const ggml_fp16_t * Kj = (const ggml_fp16_t *) ((const char *) K->data + j*K->nb[2]);
        const ggml_fp16_t * Vj = (const ggml_fp16_t *) ((const char *) V->data + j*V->nb[2]);
        const float       * cp = (const float *) ((const char *) P->data + j*P->nb[1]);
        const int64_t     * sl = slots_of(j);

        // cell positions as they will be after this ubatch (pos - 0.5, +inf when free)
        std::memcpy(pe.data(), cp, C*sizeof(float));
        std::fill(src.begin(), src.end(), -1);
        for (int64_t t = 0; t < T; ++t) {
            GGML_ASSERT(sl[t] >= 0 && sl[t] < C);
            pe[sl[t]]  = qpos[t] - 0.5f;
            src[sl[t]] = (int32_t) t;
        }
        int64_t lo = 0, hi = C;
        while (lo < hi && std::isinf(pe[lo])) {
            ++lo;
        }
        while (hi > lo && std::isinf(pe[hi - 1])) {
            --hi;
        }
        const int64_t W = hi - lo, Wp = (W + HH_TC - 1)/HH_TC*HH_TC;

        // the usual prefill: every cell held before the ubatch precedes its first query and the
        // ubatch's positions increase; then a row's mask is the free cells (a vector add of 0 or
        // -inf) and the ubatch's later tokens, instead of a compare per cell
        bool ordered = true;
        for (int64_t t = 1; t < T; ++t) {
            ordered = ordered && qpos[t] > qpos[t - 1];
        }
        bias.resize(Wp);
        for (int64_t i = 0; i < W; ++i) {
            const int64_t c = lo + i;
            const bool free = std::isinf(pe[c]);
            ordered = ordered && (free || src[c] >= 0 || pe[c] < qpos[0]);
            bias[i] = free ? -INFINITY : 0.0f;
        }

        // f32 K transposed [D][Wp] and V [Dv][Wp]; free and padding cells zero
        kt.assign(D*Wp, 0.0f);
        vf.assign(Dv*Wp, 0.0f);
        lg.resize(HH_RB*Wp);
        float krow[GGML_FASTGEN_HH_MAX_D];
        for (int64_t i = 0; i < W; ++i) {
            const int64_t c = lo + i;
            if (std::isinf(pe[c])) {
                continue;
            }
            if (src[c] >= 0) {
                const float * kr = (const float *) ((const char *) kc->data + j*kc->nb[1] + src[c]*kc->nb[2]);
                const float * vr = (const float *) ((const char *) vc->data + j*vc->nb[1] + src[c]*vc->nb[2]);
                for (int64_t d = 0; d < D; ++d) {
                    kt[d*Wp + i] = GGML_CPU_FP16_TO_FP32(GGML_CPU_FP32_TO_FP16(kr[d]));
                }
                for (int64_t d = 0; d < Dv; ++d) {
                    vf[d*Wp + i] = GGML_CPU_FP16_TO_FP32(GGML_CPU_FP32_TO_FP16(vr[d]));
                }
            } else {
                ggml_cpu_fp16_to_fp32(Kj + c*D, krow, D);
                for (int64_t d = 0; d < D; ++d) {
                    kt[d*Wp + i] = krow[d];
                }
                for (int64_t d = 0; d < Dv; ++d) {
                    vf[d*Wp + i] = GGML_CPU_FP16_TO_FP32(Vj[c + d*C]);
                }
            }
        }

        float * part = parts + (params->ith*n + j)*C; // this thread's column sums of head j
        std::fill(part, part + C, 0.0f);
        for (int64_t r0 = params->ith*HH_RB; r0 < R; r0 += params->nth*HH_RB) {
            const int64_t nr = std::min(HH_RB, R - r0);
            for (int64_t r = 0; r < HH_RB; ++r) {
                const int64_t t = (r0 + r)/G, g = (r0 + r)%G;
                for (int64_t d = 0; d < D; ++d) {
                    qb[r*D + d] = r < nr ? scale*((const float *) ((const char *) q->data + (j*G + g)*q->nb[1] + t*q->nb[2]))[d] : 0.0f;
                }
            }
            hh_logits(D, Wp, qb.data(), kt.data(), lg.data());
            for (int64_t r = 0; r < nr; ++r) {
                float * l = lg.data() + r*Wp;
                const int64_t t = (r0 + r)/G;
                if (ordered) {
                    for (int64_t i = 0; i < W; ++i) {
                        l[i] += bias[i];
                    }
                    for (int64_t u = t + 1; u < T; ++u) {
                        l[sl[u] - lo] = -INFINITY;
                    }
                } else {
                    for (int64_t i = 0; i < W; ++i) {
                        l[i] = qpos[t] - pe[lo + i] > 0.0f ? l[i] : -INFINITY; // occupied and not after the query
                    }
                }
                const float m = hh_max(W, l);
                std::fill(l + W, l + Wp, 0.0f);
                if (m == -INFINITY) {
                    std::fill(l, l + W, 0.0f);
                    continue;
                }
                const ggml_float sum = ggml_vec_soft_max_f32((int) W, l, l, m);
                ggml_vec_scale_f32((int) W, l, sum > 0.0 ? (float) (1.0/sum) : 0.0f); // as the decode path
                ggml_vec_acc_f32((int) W, part + lo, l);
            }
            hh_output(Dv, Wp, lg.data(), vf.data(), ob.data());
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t t = (r0 + r)/G, g = (r0 + r)%G;
                std::memcpy((char *) dst->data + t*dst->nb[1] + (j*G + g)*Dv*sizeof(float), ob.data() + r*Dv, Dv*sizeof(float));
            }
        }
    }

    ggml_barrier(params->threadpool);

    for (int64_t j = params->ith; j < n; j += params->nth) {
        ggml_fp16_t * Kj = (ggml_fp16_t *) ((char *) K->data + j*K->nb[2]);
        ggml_fp16_t * Vj = (ggml_fp16_t *) ((char *) V->data + j*V->nb[2]);
        float       * cp = (float *) ((char *) P->data + j*P->nb[1]);
        float       * s  = (float *) ((char *) S->data + j*S->nb[1]);
        const int64_t * sl = slots_of(j);
        for (int64_t c = 0; c < C; ++c) {
            float sum = 0.0f;
            for (int th = 0; th < params->nth; ++th) {
                sum += parts[(th*n + j)*C + c];
            }
            s[c] = !std::isinf(cp[c]) ? s[c] + sum : sum; // a select: a NaN left in a free cell dies here
        }
        for (int64_t t = 0; t < T; ++t) {
            const int64_t c = sl[t];
            float sum = 0.0f;
            for (int th = 0; th < params->nth; ++th) {
                sum += parts[(th*n + j)*C + c];
            }
            s[c]  = sum; // a new or reused cell starts from this ubatch's attention
            cp[c] = qpos[t] - 0.5f;
            ggml_cpu_fp32_to_fp16((const float *) ((const char *) kc->data + j*kc->nb[1] + t*kc->nb[2]), Kj + c*D, D);
            const float * vr = (const float *) ((const char *) vc->data + j*vc->nb[1] + t*vc->nb[2]);
            for (int64_t d = 0; d < Dv; ++d) {
                Vj[c + d*C] = GGML_CPU_FP32_TO_FP16(vr[d]);
            }
        }
    }
}

void ggml_compute_forward_fastgen_hh_attn(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_fastgen_hh_args a = ggml_fastgen_hh_unpack(dst);
    // query rows per head; each token's own column sums (U) only the heads path keeps
    if (ggml_fastgen_hh_decode(&a) || a.U) {
        hh_attn_heads(params, dst);
    } else {
        hh_attn_rows(params, dst);
    }
}
