// llama-fastgen: CPU implementation of GGML_OP_FASTGEN_HH_ATTN (see ggml-fastgen.h), compiled into
// ggml-cpu. Plain loops, heads split over the threads: it is the reference of the CUDA kernel.
#include "ggml-fastgen.h"

#include "ggml-cpu-impl.h"

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

    std::vector<float> krow(D), logit(C), colsum(C), out(Dv), keep(C);
    for (int64_t j = params->ith; j < n; j += params->nth) {
        ggml_fp16_t * Kj = (ggml_fp16_t *) ((char *) K->data + j*K->nb[2]);
        ggml_fp16_t * Vj = (ggml_fp16_t *) ((char *) V->data + j*V->nb[2]);
        float       * cp = (float *) ((char *) P->data + j*P->nb[1]);

        // 1. the new tokens' K, V and positions into their cells; a new or free cell's score restarts
        for (int64_t c = 0; c < C; ++c) {
            keep[c] = std::isinf(cp[c]) ? 0.0f : 1.0f;
        }
        for (int64_t t = 0; t < T; ++t) {
            const int64_t c = ((const int64_t *) ((const char *) idxs->data + (h0 + j)*idxs->nb[1]))[t];
            GGML_ASSERT(c >= 0 && c < C);
            cp[c]   = ((const float *) qpos->data)[t] - 0.5f;
            keep[c] = 0.0f;
            ggml_fp32_to_fp16_row((const float *) ((const char *) kc->data + j*kc->nb[1] + t*kc->nb[2]), Kj + c*D, D);
            const float * vr = (const float *) ((const char *) vc->data + j*vc->nb[1] + t*vc->nb[2]);
            for (int64_t d = 0; d < Dv; ++d) {
                Vj[c + d*C] = ggml_fp32_to_fp16(vr[d]);
            }
        }

        // 2. softmax over the visible cells, output, column sums
        std::fill(colsum.begin(), colsum.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
            const float qp = ((const float *) qpos->data)[t];
            for (int64_t g = 0; g < G; ++g) {
                const float * qr = (const float *) ((const char *) q->data + (j*G + g)*q->nb[1] + t*q->nb[2]);
                float m = -INFINITY;
                for (int64_t c = 0; c < C; ++c) {
                    logit[c] = -INFINITY;
                    if (qp - cp[c] > 0.0f) {
                        ggml_fp16_to_fp32_row(Kj + c*D, krow.data(), D);
                        float dot = 0.0f;
                        for (int64_t d = 0; d < D; ++d) {
                            dot += qr[d]*krow[d];
                        }
                        logit[c] = scale*dot;
                        m = std::max(m, logit[c]);
                    }
                }
                double sum = 0.0;
                for (int64_t c = 0; c < C; ++c) {
                    logit[c] = logit[c] == -INFINITY ? 0.0f : std::exp(logit[c] - m);
                    sum += logit[c];
                }
                const float inv = sum > 0.0 ? (float) (1.0/sum) : 0.0f;
                std::fill(out.begin(), out.end(), 0.0f);
                for (int64_t c = 0; c < C; ++c) {
                    const float p = logit[c]*inv;
                    if (p == 0.0f) {
                        continue;
                    }
                    colsum[c] += p;
                    for (int64_t d = 0; d < Dv; ++d) {
                        out[d] += p*ggml_fp16_to_fp32(Vj[c + d*C]);
                    }
                }
                std::memcpy((char *) dst->data + t*dst->nb[1] + (j*G + g)*Dv*sizeof(float), out.data(), Dv*sizeof(float));
            }
        }

        // 3. accumulated attention: reset for free or reused cells, then add this ubatch's
        float * s = (float *) ((char *) S->data + j*S->nb[1]);
        for (int64_t c = 0; c < C; ++c) {
            s[c] = keep[c] != 0.0f ? s[c] + colsum[c] : colsum[c]; // a select: a NaN left in a free cell dies here
        }
    }
}
