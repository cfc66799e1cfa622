// llama-fastgen: CPU implementation of GGML_OP_FASTGEN_HH_ATTN (see ggml-fastgen.h), compiled into
// ggml-cpu. Heads split over the threads; ggml-cpu's SIMD dots and conversions. It is the reference of
// the CUDA kernel.
#include "ggml-fastgen.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "simd-mappings.h"
#include "vec.h"

#include <cmath>
#include <cstring>
#include <vector>

void ggml_compute_forward_fastgen_hh_attn(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[GGML_FASTGEN_HH_Q];
    const ggml_tensor * kc   = dst->src[GGML_FASTGEN_HH_K_CUR];
    const ggml_tensor * vc   = dst->src[GGML_FASTGEN_HH_V_CUR];
    const ggml_tensor * idxs = dst->src[GGML_FASTGEN_HH_IDXS];
    ggml_tensor       * K    = dst->src[GGML_FASTGEN_HH_K];
    ggml_tensor       * V    = dst->src[GGML_FASTGEN_HH_V];
    ggml_tensor       * S    = dst->src[GGML_FASTGEN_HH_S];
    ggml_tensor       * P    = dst->src[GGML_FASTGEN_HH_P];
    const ggml_tensor * qpos = dst->src[GGML_FASTGEN_HH_QUERY_POS];

    const int64_t D = K->ne[0], C = K->ne[1], n = K->ne[2], Dv = V->ne[1], T = q->ne[2], G = q->ne[1]/n;
    float scale;
    std::memcpy(&scale, dst->op_params, sizeof(float));
    const int64_t h0 = dst->op_params[1];
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

        // 3. softmax over the visible cells, output, column sums
        std::fill(colsum.begin(), colsum.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
            const float qp = ((const float *) qpos->data)[t];
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
