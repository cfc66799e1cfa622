// Builds (metadata only, nothing computed) four layers' attention as llama-graph-fastgen.cpp does and prints the
// regions ggml_fastgen_branch_regions (ggml-fastgen-branches.h; ggml-fastgen-streams.cu runs them on two CUDA
// streams) finds, one JSON object per region:
//   layer 0 mixes a full class with heavy-hitter heads: a region;
//   layer 1 has heavy-hitter heads only: no concat, no region;
//   layer 2 mixes them, but the op's first reader is the full class, not a concat: no join, no region;
//   layer 3 mixes them, but both classes read K through one view made after the fork: not split (views are
//   nobody's only before the fork; after it a node of branch 1 may not read one of branch 2's);
//   layer 4 mixes them as llama.cpp's flash attention path does: marked K and V rows (ggml_fastgen_rows_pair pairs
//   them) and a marked flash attention, whose concat with the op CUDA may leave out (ggml_fastgen_join_in_place);
//   layer 5 as 4 with the op first in the concat (the frequent class first in class order);
//   layer 6 as 4, but another node reads the flash attention's output too: its concat stays.
// Arguments: tokens T (default 1) and beside (default 1: no eval callback); the finder splits decode steps only
// (G*T query rows per head up to GGML_FASTGEN_HH_MAX_ROWS) of graphs with beside = 1.
// tests/test_branches.py compiles it against ggml-base and checks the output.
#include "ggml-fastgen.h"
#include "ggml-fastgen-branches.h"

#include <cstdio>
#include <cstdlib>
#include <string>

static ggml_tensor * named(ggml_tensor * t, const std::string & name) {
    ggml_set_name(t, name.c_str());
    return t;
}

// a [D, n, T] tensor's heads [h0, h0 + n)
static ggml_tensor * heads(ggml_context * ctx, ggml_tensor * t, int64_t h0, int64_t n) {
    return ggml_view_3d(ctx, t, t->ne[0], n, t->ne[2], t->nb[1], t->nb[2], h0*t->nb[1]);
}

int main(int argc, char ** argv) {
    const int64_t T = argc > 1 ? atoi(argv[1]) : 1;
    const int32_t beside = argc > 2 ? atoi(argv[2]) : 1;
    const int64_t D = 64, H = 4, G = 2, C = 128, N_KV = 256, n_full = 1, n_hh = H - n_full;
    ggml_init_params ip = { 64u*1024*1024, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_cgraph * gf = ggml_new_graph(ctx);

    ggml_tensor * x     = named(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H, T), "x");
    ggml_tensor * idxs  = named(ggml_new_tensor_2d(ctx, GGML_TYPE_I64, T, 2*n_hh), "hh_idxs");
    ggml_tensor * qpos  = named(ggml_new_tensor_1d(ctx, GGML_TYPE_F32, T), "query_pos");
    ggml_tensor * k_idx = named(ggml_new_tensor_1d(ctx, GGML_TYPE_I64, T), "k_idxs");
    ggml_tensor * v_idx = named(ggml_new_tensor_1d(ctx, GGML_TYPE_I64, T), "v_idxs");

    ggml_tensor * cur = x;
    ggml_tensor * pos = named(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, T), "inp_pos");
    for (int il = 0; il < 7; ++il) {
        const std::string l = "-" + std::to_string(il);
        const int64_t nf = il == 1 ? 0 : n_full, nh = H - nf;
        ggml_tensor * wq = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H, D*H*G);
        ggml_tensor * wk = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H, D*H);
        ggml_tensor * wv = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H, D*H);
        ggml_tensor * q_cur = named(ggml_reshape_3d(ctx, named(ggml_mul_mat(ctx, wq, cur), "q_proj" + l), D, H*G, T), "Qcur" + l);
        ggml_tensor * k_cur = named(ggml_rope(ctx, ggml_reshape_3d(ctx, named(ggml_mul_mat(ctx, wk, cur), "k_proj" + l), D, H, T),
                pos, (int) D, 0), "Kcur" + l);
        // llama.cpp reshapes V once for every head: a view both classes read (session 30's first GPU run found no region because of it)
        ggml_tensor * v_cur = named(ggml_reshape_3d(ctx, named(ggml_mul_mat(ctx, wv, cur), "v_proj" + l), D, H, T), "Vcur" + l);
        ggml_build_forward_expand(gf, q_cur);
        ggml_build_forward_expand(gf, v_cur);
        ggml_build_forward_expand(gf, k_cur);

        // layer 3: both classes' K views go through one view of every head, made after the fork
        ggml_tensor * k_all = il == 3 ? named(heads(ctx, k_cur, 0, H), "Kall" + l) : k_cur;
        ggml_tensor * K = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, D, C, nh);
        ggml_tensor * V = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, C, D, nh);
        ggml_tensor * S = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, C, nh);
        ggml_tensor * P = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, C + GGML_FASTGEN_HH_P_PAD, nh);
        ggml_tensor * hh = named(ggml_fastgen_hh_attn(ctx, named(heads(ctx, q_cur, nf*G, nh*G), "q_hh" + l),
                named(heads(ctx, k_all, nf, nh), "k_hh" + l), named(heads(ctx, v_cur, nf, nh), "v_hh" + l),
                idxs, K, V, S, P, qpos, nullptr, 0.125f, 0, beside), "kqv_hh" + l);
        ggml_tensor * out = nullptr;
        if (nf > 0) { // the full class: K and V rows into its cache, attention over its cells
            ggml_tensor * kc = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*nf, N_KV);
            ggml_tensor * vc = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*nf, N_KV);
            ggml_tensor * k = heads(ctx, k_all, 0, nf), * v = heads(ctx, v_cur, 0, nf);
            if (il >= 4) { // as llama-graph-fastgen.cpp with flash attention: views of the rows, both marked
                for (ggml_tensor * rows : { named(ggml_set_rows(ctx, kc, ggml_view_2d(ctx, k, D*nf, T, k->nb[2], 0), k_idx), "k_rows" + l),
                                            named(ggml_set_rows(ctx, vc, ggml_view_2d(ctx, v, D*nf, T, v->nb[2], 0), v_idx), "v_rows" + l) }) {
                    ggml_fastgen_mark(rows, GGML_FASTGEN_MARK_ROWS);
                    ggml_build_forward_expand(gf, rows);
                }
                ggml_tensor * mask = named(ggml_new_tensor_2d(ctx, GGML_TYPE_F16, N_KV, T), "kq_mask" + l);
                ggml_tensor * fa = named(ggml_flash_attn_ext(ctx, ggml_permute(ctx, heads(ctx, q_cur, 0, nf*G), 0, 2, 1, 3),
                        ggml_permute(ctx, ggml_reshape_3d(ctx, kc, D, nf, N_KV), 0, 2, 1, 3),
                        ggml_permute(ctx, ggml_reshape_3d(ctx, vc, D, nf, N_KV), 0, 2, 1, 3), mask, 0.125f, 0.0f, 0.0f), "fa" + l);
                ggml_fastgen_mark(fa, GGML_FASTGEN_MARK_FA);
                out = named(ggml_reshape_2d(ctx, fa, D*G*nf, T), "kqv_full" + l);
                if (il == 6) {
                    ggml_build_forward_expand(gf, named(ggml_scale(ctx, out, 2.0f), "second_reader" + l));
                }
                out = named(il == 5 ? ggml_concat(ctx, hh, out, 0) : ggml_concat(ctx, out, hh, 0), "kqv_out" + l);
                cur = named(ggml_mul_mat(ctx, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H*G, D*H), out), "attn_out" + l);
                ggml_build_forward_expand(gf, cur);
                continue;
            }
            ggml_build_forward_expand(gf, named(ggml_set_rows(ctx, kc, ggml_reshape_2d(ctx, ggml_cont(ctx, k), D*nf, T), k_idx), "k_rows" + l));
            ggml_build_forward_expand(gf, named(ggml_set_rows(ctx, vc, ggml_reshape_2d(ctx, ggml_cont(ctx, v), D*nf, T), v_idx), "v_rows" + l));
            ggml_tensor * q  = ggml_cont(ctx, heads(ctx, q_cur, 0, nf*G));
            if (il == 2) { // the full class reads the heavy-hitter op (before any concat): no region
                q = ggml_add(ctx, q, ggml_reshape_3d(ctx, ggml_view_1d(ctx, hh, D*nf*G*T, 0), D, nf*G, T));
            }
            ggml_tensor * kq = named(ggml_soft_max(ctx, ggml_mul_mat(ctx, ggml_reshape_3d(ctx, kc, D, N_KV, nf), q)), "kq_full" + l);
            ggml_tensor * vt = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, vc, D, N_KV*nf)));
            out = named(ggml_reshape_2d(ctx, ggml_mul_mat(ctx, vt, kq), D*G*nf, T), "kqv_full" + l);
        }
        out = out ? named(ggml_concat(ctx, out, hh, 0), "kqv_out" + l) : hh;
        ggml_tensor * wo = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D*H*G, D*H);
        cur = named(ggml_mul_mat(ctx, wo, out), "attn_out" + l);
        ggml_build_forward_expand(gf, cur);
    }

    const std::vector<ggml_fastgen_branches> regions = ggml_fastgen_branch_regions(gf, getenv("DEBUG") != nullptr);
    printf("{\"regions\": [");
    for (size_t r = 0; r < regions.size(); ++r) {
        const ggml_fastgen_branches & b = regions[r];
        printf("%s{\"op\": \"%s\", \"fork\": \"%s\", \"join\": \"%s\", \"in_place\": %d, \"nodes\": [", r ? ", " : "",
               b.op->name, gf->nodes[b.fork]->name, gf->nodes[b.join]->name, ggml_fastgen_join_in_place(gf, b) != nullptr ? 1 : 0);
        for (size_t k = 0; k < b.nodes.size(); ++k) {
            printf("%s[\"%s\", %d, %d]", k ? ", " : "", b.nodes[k]->name, b.branch[k], ggml_fastgen_noop(b.nodes[k]) ? 1 : 0);
        }
        printf("]}");
    }
    printf("], \"rows_pairs\": [");
    for (int i = 0, first = 1; i < gf->n_nodes; ++i) { // every ROWS-marked node and the node it pairs with
        if (ggml_fastgen_marked(gf->nodes[i], GGML_OP_SET_ROWS, GGML_FASTGEN_MARK_ROWS)) {
            const int m = ggml_fastgen_rows_pair(gf, i);
            printf("%s[\"%s\", \"%s\"]", first ? "" : ", ", gf->nodes[i]->name, m < 0 ? "" : gf->nodes[m]->name);
            first = 0;
        }
    }
    printf("]}\n");
    ggml_free(ctx);
    return 0;
}
