#include "llama-graph-fastgen.h"

#include "llama-kv-cache-fastgen.h"
#include "llama-fastgen-model.h"
#include "ggml-fastgen.h"
#include "llama-fastgen-timing.h"
#include "llama-impl.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

static ggml_tensor * new_kq_mask(ggml_context * ctx, const llama_kv_cache_context * mctx,
                                 const llama_ubatch & ubatch, const llama_cparams & cparams) {
    const auto n_stream = cparams.kv_unified ? 1 : ubatch.n_seqs_unq;
    return ggml_new_tensor_4d(ctx, cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32,
            mctx->get_n_kv(), ubatch.n_tokens/n_stream, 1, n_stream);
}

// Where the cache says so (one_input(): it is in one device's memory, or LLAMA_FASTGEN_INPUT_COPY=1), every fastgen input of a
// ubatch is a typed view of one graph input, the blob, read through its one copy (a CONT; on a device a device-to-device
// memcpy): llama.cpp's scheduler copies each graph input to a device on its own, with a synchronous copy and stream syncs
// per ubatch (ggml_backend_sched_compute_splits), and a class adds two to three inputs, the heavy-hitter stores two to
// four. CUDA gives the same logits to the bit either way; on the CPU it is the same ops on the same values (tests).
namespace {
struct input_blob {
    struct part {
        ggml_tensor ** dst;
        ggml_tensor *  like;
        std::string    name;
        size_t         offs;
    };
    std::vector<part> parts;
    size_t size = 0;

    // *dst becomes a tensor of like's type and shape: like itself (an input of its own) or a view of the blob
    void add(ggml_tensor ** dst, ggml_tensor * like, std::string name) {
        parts.push_back({ dst, like, std::move(name), size });
        size += GGML_PAD(ggml_nbytes(like), 256); // each view aligned as a tensor of its own would be
    }

    // the blob, or nullptr where each part is an input of its own
    ggml_tensor * build(ggml_context * ctx, bool one_input) const {
        ggml_tensor * blob = nullptr, * copy = nullptr;
        if (one_input) {
            blob = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) (size/sizeof(int32_t)));
            ggml_set_input(blob);
            ggml_set_name(blob, "attn_inp_fastgen");
            copy = ggml_cont(ctx, blob);
        }
        for (const part & p : parts) {
            ggml_tensor * t = p.like;
            if (copy) {
                t = ggml_view_1d(ctx, copy, (int64_t) (GGML_PAD(ggml_nbytes(p.like), 4)/4), p.offs);
                t->type = p.like->type; // the same bytes read as the part's type: a view cannot change it, so set it here
                for (int i = 0; i < GGML_MAX_DIMS; ++i) {
                    t->ne[i] = p.like->ne[i];
                    t->nb[i] = p.like->nb[i];
                }
            } else {
                ggml_set_input(t);
            }
            ggml_set_name(t, p.name.c_str());
            *p.dst = t;
        }
        return blob;
    }
};
} // namespace

// nullptr when every class is frequent (the base class only keeps the pointer)
static const llama_kv_cache_context * first_ctx(const llama_kv_cache_fastgen_context * m) {
    for (size_t c = 0; c < m->get_cache()->n_class(); ++c) {
        if (m->get((int) c)) {
            return m->get((int) c);
        }
    }
    return nullptr;
}

llm_graph_input_attn_kv_fastgen::llm_graph_input_attn_kv_fastgen(
        const llama_hparams & hparams, const llama_cparams & cparams, const llama_kv_cache_fastgen_context * mctx) :
    llm_graph_input_attn_kv(hparams, cparams, first_ctx(mctx)), mctx_fg(mctx) {
}

ggml_tensor llm_graph_input_attn_kv_fastgen::host(const ggml_tensor * t) const {
    ggml_tensor h = *t;
    if (!blob) {
        return h; // an input of its own
    }
    h.data      = (char *) blob->data + t->view_offs; // a view of the blob's copy: the blob's own offsets
    h.buffer    = blob->buffer;
    h.view_src  = nullptr;
    h.view_offs = 0;
    return h;
}

void llm_graph_input_attn_kv_fastgen::set_input(const llama_ubatch * ubatch) {
    for (size_t c = 0; c < cls.size(); ++c) {
        const auto * m = mctx_fg->get((int) c);
        if (!m) {
            continue;
        }
        ggml_tensor k_idxs = host(cls[c].k_idxs);
        m->set_input_k_idxs(&k_idxs, ubatch);
        if (cls[c].v_idxs != cls[c].k_idxs) {
            ggml_tensor v_idxs = host(cls[c].v_idxs);
            m->set_input_v_idxs(&v_idxs, ubatch);
        }
        set_input_mask((int) c, ubatch);
    }
    if (const auto * cache = mctx_fg->get_cache(); cache->hh_store()) {
        // a fused ubatch's eviction and placement, which may wait for the device: last, so that the host
        // work before it overlaps the previous ubatch's compute
        mctx_fg->hh_place();
        ggml_tensor idxs = host(hh.idxs), query_pos = host(hh.query_pos);
        for (uint32_t g = 0; g < hh_n_groups(*ubatch); ++g) {
            cache->hh_store(hh_group_seq(*ubatch, g))->set_input_idxs(&idxs, g*(ubatch->n_tokens/hh_n_groups(*ubatch)));
        }
        llama_fastgen_hh_store::set_input_query_pos(&query_pos, *ubatch);
        if (hh.keep) { // composed ubatch: one sequence
            const auto * st = cache->hh_store(hh_group_seq(*ubatch, 0));
            ggml_tensor keep = host(hh.keep), cell_pos = host(hh.cell_pos);
            st->set_input_keep(&keep);
            st->set_input_cell_pos(&cell_pos);
        }
    }
    llama_fastgen_timing_record().inputs_set(); // LLAMA_FASTGEN_TIMING=1
}

// A decode step's mask of a full class (no window, nothing retained) differs from the last step's in one
// cell, the new token's, when exactly this step's ubatch changed the cells since (no removal, copy, shift
// or restore between, which all count as changes). That cell becomes visible; llama.cpp's fill instead
// passes over every cell: at n_ctx 65,536 it took 190 us per token on the host of an H100 machine, the GPU
// idle meanwhile, a cost no byte saved by the compressed classes takes off.
void llm_graph_input_attn_kv_fastgen::set_input_mask(int c, const llama_ubatch * ubatch) {
    static const bool check = llama_fastgen_env_flag_or_unset(LLAMA_FASTGEN_SWITCH_CHECK_MASK);
    const auto * cache = mctx_fg->get_cache();
    const auto * m     = mctx_fg->get(c);
    ggml_tensor   host_mask = host(cls[c].kq_mask), host_k_idxs = host(cls[c].k_idxs);
    ggml_tensor * mask = &host_mask;
    auto & memo = cls[c].memo;
    const bool step = cache->get_policy().classes[c].kind == LLAMA_FASTGEN_FULL && cparams.causal_attn &&
            !hparams.use_alibi && ubatch->n_tokens == 1 && ubatch->n_seq_id[0] == 1 && !ubatch->is_pos_2d() &&
            ggml_nelements(mask) == mask->ne[0];
    const llama_seq_id seq = step ? ubatch->seq_id[0][0] : -1;
    const llama_pos    pos = step ? ubatch->pos[0] : -1;
    // the new token's cell in its stream (a cache of one stream per sequence offsets the others' indices)
    const int64_t     cell = step ? ((const int64_t *) host_k_idxs.data)[0] % cache->class_cells(c) : -1;
    const size_t        es = ggml_element_size(mask);
    llama_fastgen_timing & timing = llama_fastgen_timing_record(); // LLAMA_FASTGEN_TIMING=1
    auto                t0 = timing.on ? llama_fastgen_timing::clock::now() : llama_fastgen_timing::clock::time_point();
    const bool     updated = step && memo.valid && memo.version + 1 == cache->cells_version() && memo.seq == seq && memo.pos + 1 == pos &&
            memo.row.size() == ggml_nbytes(mask) && cell >= 0 && cell < mask->ne[0] &&
            std::any_of(memo.row.data() + cell*es, memo.row.data() + (cell + 1)*es, [](char b) { return b != 0; }); // was masked
    if (updated) {
        std::memset(memo.row.data() + cell*es, 0, es); // +0 in F16 and F32: visible
        cache->masks.updated++;
        if (check) { // the full fill as well, which is what the tensor then holds
            m->set_input_kq_mask(mask, ubatch, cparams.causal_attn);
            if (std::memcmp(mask->data, memo.row.data(), memo.row.size()) != 0) {
                cache->masks.mismatched++;
                LLAMA_LOG_ERROR("%s: class %d: the mask updated from the last step differs from llama.cpp's fill "
                        "(position %d)\n", __func__, c, pos);
                memo.row.assign((const char *) mask->data, (const char *) mask->data + ggml_nbytes(mask));
            }
        } else {
            std::memcpy(mask->data, memo.row.data(), memo.row.size());
        }
    } else {
        m->set_input_kq_mask(mask, ubatch, cparams.causal_attn);
        if (step) {
            cache->masks.filled++;
            memo.row.assign((const char *) mask->data, (const char *) mask->data + ggml_nbytes(mask));
        }
    }
    if (step) {
        timing.lap(updated ? llama_fastgen_timing::MASK_UPDATE : llama_fastgen_timing::MASK_FILL, t0);
    }
    memo.valid   = step;
    memo.version = cache->cells_version();
    memo.seq     = seq;
    memo.pos     = pos;
}

bool llm_graph_input_attn_kv_fastgen::can_reuse(const llm_graph_params & params) {
    mctx_fg = dynamic_cast<const llama_kv_cache_fastgen_context *>(params.mctx);
    if (!mctx_fg) {
        return false;
    }
    this->mctx = first_ctx(mctx_fg);
    const auto n_stream = params.cparams.kv_unified ? 1 : params.ubatch.n_seqs_unq;
    bool res = true;
    res &= !hh.idxs || hh.idxs->ne[0] == params.ubatch.n_tokens;
    for (uint32_t g = 0; hh.idxs && g < hh_n_groups(params.ubatch); ++g) {
        res &= hh.seqs.size() == hh_n_groups(params.ubatch) && hh.seqs[g] == hh_group_seq(params.ubatch, g);
    }
    res &= !hh.keep || hh.keep->ne[0] == mctx_fg->hh_n_active();
    for (size_t c = 0; c < cls.size(); ++c) {
        const auto * m = mctx_fg->get((int) c);
        if (!m) {
            continue;
        }
        const ggml_tensor * mask = cls[c].kq_mask;
        res &= cls[c].k_idxs->ne[0] == params.ubatch.n_tokens;
        res &= mask->ne[0] == m->get_n_kv();
        res &= mask->ne[1] == params.ubatch.n_tokens/n_stream;
        res &= mask->ne[3] == n_stream;
    }
    return res;
}

llm_graph_input_attn_kv * llama_fastgen_build_attn_inp(const llm_graph_context & g) {
    const auto * m = dynamic_cast<const llama_kv_cache_fastgen_context *>(g.mctx);
    if (!m) {
        return nullptr;
    }
    m->get_cache()->hh_memory().set_sched(g.sched); // the scheduler that will compute over the stores
    auto inp = std::make_unique<llm_graph_input_attn_kv_fastgen>(g.hparams, g.cparams, m);
    inp->cls.resize(m->get_cache()->n_class());
    const int64_t n_tokens = g.ubatch.n_tokens;
    input_blob blob;
    if (const auto * st = m->get_cache()->hh_store()) {
        auto & in = inp->hh;
        const int64_t C = m->hh_n_active(), H = st->n_head_total();
        blob.add(&in.idxs,      ggml_new_tensor_2d(g.ctx0, GGML_TYPE_I64, n_tokens, H), "attn_inp_hh_idxs");
        blob.add(&in.query_pos, ggml_new_tensor_4d(g.ctx0, GGML_TYPE_F32, 1, n_tokens, 1, 1), "attn_inp_hh_query_pos");
        for (uint32_t gr = 0; gr < hh_n_groups(g.ubatch); ++gr) {
            in.seqs.push_back(hh_group_seq(g.ubatch, gr));
        }
        if (!st->fused((uint32_t) n_tokens)) {
            blob.add(&in.keep,     ggml_new_tensor_2d(g.ctx0, GGML_TYPE_F32, C, H), "attn_inp_hh_keep");
            blob.add(&in.cell_pos, ggml_new_tensor_4d(g.ctx0, GGML_TYPE_F32, C, 1, 1, H), "attn_inp_hh_cell_pos");
        }
    }
    for (size_t c = 0; c < inp->cls.size(); ++c) {
        const auto * mc = m->get((int) c);
        if (!mc) {
            continue;
        }
        blob.add(&inp->cls[c].k_idxs, mc->build_input_k_idxs(g.ctx0, g.ubatch), "attn_inp_k_idxs_c" + std::to_string(c));
        // untransposed V: llama.cpp's V indices equal the K ones, one view serves both (set after build())
        if (m->get_cache()->v_transposed()) {
            blob.add(&inp->cls[c].v_idxs, mc->build_input_v_idxs(g.ctx0, g.ubatch), "attn_inp_v_idxs_c" + std::to_string(c));
        }
        blob.add(&inp->cls[c].kq_mask, new_kq_mask(g.ctx0, mc, g.ubatch, g.cparams), "attn_inp_kq_mask_c" + std::to_string(c));
    }
    inp->blob = blob.build(g.ctx0, m->get_cache()->one_input());
    for (auto & cl : inp->cls) {
        cl.v_idxs = cl.v_idxs ? cl.v_idxs : cl.k_idxs;
    }
    return (llm_graph_input_attn_kv *) g.res->add_input(std::move(inp));
}

// contiguous range of heads [h0, h0+n) of a [d, n_head, n_tokens] tensor, without a copy
static ggml_tensor * head_range(ggml_context * ctx, ggml_tensor * t, int64_t h0, int64_t n) {
    return ggml_view_3d(ctx, t, t->ne[0], n, t->ne[2], t->nb[1], t->nb[2], h0*t->nb[1]);
}

// a [.., .., T] tensor's tokens [t0, t0 + n) (dimension 2), or an input's [T, ..] ones (dimension 0 or 1)
static ggml_tensor * token_range(ggml_context * ctx, ggml_tensor * t, int dim, int64_t t0, int64_t n) {
    int64_t ne[4] = { t->ne[0], t->ne[1], t->ne[2], t->ne[3] };
    ne[dim] = n;
    return ggml_view_4d(ctx, t, ne[0], ne[1], ne[2], ne[3], t->nb[1], t->nb[2], t->nb[3], t0*t->nb[dim]);
}

// Attention of the frequent classes: explicit softmax over the head's own cells (its probabilities
// feed the scores), then new tokens' K/V and the scores written back into the store.
static ggml_tensor * build_attn_hh(const llm_graph_context & g, const llama_kv_cache_fastgen & cache,
        llm_graph_input_attn_kv_fastgen::per_hh & in, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
        int64_t n_group, float kq_scale, int il) {
    ggml_context * ctx0 = g.ctx0;
    const llama_fastgen_hh_store & st = *cache.hh_store(in.seqs[0]);
    const int32_t li = st.layer_of(il);
    const auto & l = st.get_layer(li);
    const int64_t D = q->ne[0], Dv = v->ne[0], n = k->ne[1], T = q->ne[2], h0 = st.head_offset(li);
    const bool on_host = ggml_backend_buffer_is_host(l.s->buffer);

    if (!in.keep) { // the fused op (ggml-fastgen.h; the store's fused()), positions from the store
        GGML_ASSERT(q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F32 && v->type == GGML_TYPE_F32);
        // one op per sequence of the ubatch, on its tokens and its store (a single group: the whole ubatch)
        const int64_t n_g = (int64_t) in.seqs.size(), T_g = T/n_g;
        // an eval callback (imatrix) has the scheduler compute the graph in parts, which may end between
        // the op and its layer's concat: then no second stream (ggml-fastgen.h, op_params)
        const int32_t beside = g.cparams.cb_eval == nullptr;
        ggml_tensor * res = nullptr;
        for (int64_t gr = 0; gr < n_g; ++gr) {
            const auto * sg = cache.hh_store(in.seqs[gr]);
            const auto & lg = sg->get_layer(li);
            ggml_tensor * u = sg->records((uint32_t) T_g) ? lg.u : nullptr; // each token's scores, for a rollback
            ggml_tensor * out = n_g == 1
                ? ggml_fastgen_hh_attn(ctx0, q, k, v, in.idxs, lg.k, lg.v, lg.s, lg.p, in.query_pos, u, kq_scale, (int32_t) h0, beside)
                : ggml_fastgen_hh_attn(ctx0, token_range(ctx0, q, 2, gr*T_g, T_g), token_range(ctx0, k, 2, gr*T_g, T_g),
                        token_range(ctx0, v, 2, gr*T_g, T_g), token_range(ctx0, in.idxs, 0, gr*T_g, T_g),
                        lg.k, lg.v, lg.s, lg.p, token_range(ctx0, in.query_pos, 1, gr*T_g, T_g), u, kq_scale, (int32_t) h0,
                        beside);
            if (on_host) {
                // the store is in host memory: run where it is (the op writes it in place), like llama.cpp's
                // own attention
                ggml_backend_sched_set_tensor_backend(g.sched, out, g.backend_cpu);
            }
            res = res ? ggml_concat(ctx0, res, out, 1) : out;
        }
        g.cb(res, "kqv_hh_fused", il);
        return res;
    }

    // attention over the store's occupied prefix [0, C) of every head (views: K rows, V and score
    // columns); new tokens are written into the whole store (their slots are inside the prefix)
    const int64_t cap = l.k->ne[1], C = in.keep->ne[0];
    ggml_tensor * Ks = ggml_view_4d(ctx0, l.k, D, C, 1, n, l.k->nb[1], l.k->nb[2], l.k->nb[2], 0);
    ggml_tensor * Vs = ggml_view_4d(ctx0, l.v, C, Dv, 1, n, l.v->nb[1], l.v->nb[2], l.v->nb[2], 0);
    ggml_tensor * Ss = ggml_view_2d(ctx0, l.s, C, n, l.s->nb[1], 0);

    // this layer's heads in the class inputs (views of host inputs: one copy each, fine per long ubatch)
    ggml_tensor * idxs = ggml_view_2d(ctx0, in.idxs, T, n, in.idxs->nb[1], h0*in.idxs->nb[1]);
    if (!in.mask) {
        // mask = log(step(q - (p - 0.5))): 0 where the cell is occupied and not after the query,
        // -inf elsewhere; built on the device once per ubatch for every layer. On the CPU, log(0)
        // takes libm's error path per masked element: 0 / -1e30 instead (exp() of either is 0).
        ggml_tensor * shape = ggml_new_tensor_4d(ctx0, GGML_TYPE_F32, C, T, 1, st.n_head_total());
        ggml_tensor * seen  = ggml_step(ctx0, ggml_sub(ctx0, ggml_repeat(ctx0, in.query_pos, shape), in.cell_pos));
        in.mask = on_host ? ggml_scale_bias(ctx0, seen, 1e30f, -1e30f) : ggml_log(ctx0, seen);
    }
    ggml_tensor * keep = ggml_view_2d(ctx0, in.keep, C, n, in.keep->nb[1], h0*in.keep->nb[1]);
    ggml_tensor * mask = ggml_view_4d(ctx0, in.mask, C, T, 1, n, in.mask->nb[1], in.mask->nb[2], in.mask->nb[3], h0*in.mask->nb[3]);

    // K rows: store [D, C, n] <- [D, T, n] at slots [T, n]
    ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, l.k, ggml_permute(ctx0, k, 0, 2, 1, 3), idxs));
    // V transposed, one element per row: store [1, C, Dv, n] <- [1, T, Dv, n] at slots [T, 1, n] (broadcast over Dv)
    ggml_tensor * v4 = ggml_view_4d(ctx0, v, 1, Dv, n, T, v->nb[0], v->nb[1], v->nb[2], 0);
    ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, ggml_reshape_4d(ctx0, l.v, 1, cap, Dv, n),
            ggml_permute(ctx0, v4, 0, 2, 3, 1), ggml_reshape_3d(ctx0, idxs, T, 1, n)));

    // queries [D, G*n, T] -> [D, T, G, n]; kq [C, T, G, n]
    ggml_tensor * q4 = ggml_view_4d(ctx0, q, D, n_group, n, T, q->nb[1], n_group*q->nb[1], q->nb[2], 0);
    ggml_tensor * qp = ggml_cont(ctx0, ggml_permute(ctx0, q4, 0, 2, 3, 1));
    ggml_tensor * kq = ggml_mul_mat(ctx0, Ks, qp);
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    kq = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, 0.0f);
    g.cb(kq, "kq_soft_max_hh", il);

    // scores [C, n] = scores * keep + attention summed over the ubatch's queries and the group, in place
    ggml_tensor * p3 = ggml_reshape_3d(ctx0, kq, C, T*n_group, n);
    ggml_tensor * col;
    if (on_host) {
        // CPU: an outer product with ones sums over the queries in place; a transposed copy costs
        // the CPU a 4-byte memcpy per probability (13% of a 2K prefill of SmolLM2, perf)
        ggml_tensor * ones = ggml_repeat_4d(ctx0, ggml_fill(ctx0, in.query_pos, 1.0f), 1, T*n_group, n, 1);
        col = ggml_out_prod(ctx0, p3, ones);                                      // [C, 1, n]
    } else {
        col = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, p3))); // [1, C, n]
    }
    ggml_build_forward_expand(g.gf, ggml_add_inplace(ctx0, ggml_mul_inplace(ctx0, Ss, keep), ggml_reshape_2d(ctx0, col, C, n)));

    // [Dv, T, G, n] -> [Dv*G*n, T], the layout of the other classes' outputs
    ggml_tensor * kqv = ggml_mul_mat(ctx0, Vs, kq);
    return ggml_reshape_2d(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, kqv, 0, 3, 1, 2)), Dv*n_group*n, T);
}

ggml_tensor * llama_fastgen_build_attn(
        const llm_graph_context & g,
        llm_graph_input_attn_kv_fastgen * inp,
        ggml_tensor * wo,
        ggml_tensor * wo_b,
        ggml_tensor * wo_s,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        float         kq_scale,
        int           il) {
    GGML_ASSERT(kq_b == nullptr && sinks == nullptr && "fastgen: attention bias/sinks are not supported");
    GGML_ASSERT(!g.cparams.training);

    ggml_context * ctx0 = g.ctx0;
    ggml_build_forward_expand(g.gf, q_cur);
    ggml_build_forward_expand(g.gf, v_cur);
    ggml_build_forward_expand(g.gf, k_cur);

    const auto & policy = inp->mctx_fg->get_cache()->get_policy();
    const int64_t n_group = q_cur->ne[1] / k_cur->ne[1];

    ggml_tensor * cur = nullptr;
    const auto * st = inp->mctx_fg->get_cache()->hh_store();
    for (size_t c = 0; c < inp->cls.size(); ++c) {
        int64_t n = policy.n_heads(il, (int) c);
        if (policy.classes[c].kind == LLAMA_FASTGEN_FREQUENT) {
            // the frequent classes are consecutive: their heads form one range, run once at the first
            if (!st || (int) c != st->first_class() || st->layer_of(il) < 0) {
                continue;
            }
            n = st->get_layer(st->layer_of(il)).n_head;
        }
        if (n == 0) {
            continue;
        }
        const int64_t h0 = policy.head_offset(il, (int) c);
        const auto * mc = inp->mctx_fg->get((int) c);

        ggml_tensor * q = head_range(ctx0, q_cur, h0*n_group, n*n_group);
        ggml_tensor * k = head_range(ctx0, k_cur, h0, n);
        ggml_tensor * v = head_range(ctx0, v_cur, h0, n);

        if (policy.classes[c].kind == LLAMA_FASTGEN_FREQUENT) {
            ggml_tensor * out = build_attn_hh(g, *inp->mctx_fg->get_cache(), inp->hh, q, k, v, n_group, kq_scale, il);
            cur = cur ? ggml_concat(ctx0, cur, out, 0) : out;
            continue;
        }

        // CUDA writes both in one launch (ggml-fastgen.h, marks)
        for (ggml_tensor * rows : { mc->cpy_k(ctx0, k, inp->cls[c].k_idxs, il), mc->cpy_v(ctx0, v, inp->cls[c].v_idxs, il) }) {
            if (rows->op == GGML_OP_SET_ROWS) {
                ggml_fastgen_mark(rows, GGML_FASTGEN_MARK_ROWS);
            }
            ggml_build_forward_expand(g.gf, rows);
        }

        ggml_tensor * out = g.build_attn_mha(q, mc->get_k(ctx0, il), mc->get_v(ctx0, il), nullptr,
                inp->cls[c].kq_mask, nullptr, nullptr, 0, kq_scale, il);
        if (out->op == GGML_OP_RESHAPE && out->src[0]->op == GGML_OP_FLASH_ATTN_EXT) {
            ggml_fastgen_mark(out->src[0], GGML_FASTGEN_MARK_FA); // CUDA decode: each KV head read once for its query heads
        }
        cur = cur ? ggml_concat(ctx0, cur, out, 0) : out;
    }
    g.cb(cur, "kqv_out", il);

    if (wo) {
        cur = g.build_lora_mm(wo, cur, wo_s);
    }
    if (wo_b) {
        cur = ggml_add(ctx0, cur, wo_b);
    }
    return cur;
}
