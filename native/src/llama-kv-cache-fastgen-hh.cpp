#include "llama-kv-cache-fastgen-hh.h"

#include "ggml-fastgen.h"

#include "llama-fastgen-model.h"
#include "llama-fastgen-timing.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#ifndef _WIN32
#include <unistd.h>
#endif

llama_fastgen_hh_store::llama_fastgen_hh_store(const llama_model & model, const llama_fastgen_policy & policy,
        ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch) :
    n_sink(policy.n_sink),
    special(policy.special_tok) {
    const auto & hp = model.hparams;
    int32_t c_last = -1;
    for (int c = 0; c < (int) policy.classes.size(); ++c) {
        if (policy.classes[c].kind != LLAMA_FASTGEN_FREQUENT) {
            continue;
        }
        if (c_last >= 0 && c != c_last + 1) {
            throw std::runtime_error("fastgen: frequent classes must be consecutive in " LLAMA_FASTGEN_KEY_CLASS_KIND " "
                    "(their heads share one store); re-run convert.py --profile");
        }
        c_first = c_first < 0 ? c : c_first;
        c_last  = c;
        cap = std::max(cap, policy.capacity(c, n_ctx, n_ubatch));
    }
    // V is stored transposed and written one element per row: a block-quantized type cannot do
    // that, so these heads keep f16
    if (ggml_is_quantized(type_k) || ggml_is_quantized(type_v)) {
        LLAMA_LOG_WARN("%s: heavy-hitter heads keep K and V in f16, not the requested %s / %s (their V is "
                "written one element per row, which a block-quantized type cannot do); the other classes use "
                "the requested types\n", __func__, ggml_type_name(type_k), ggml_type_name(type_v));
    }
    if (ggml_is_quantized(type_k)) {
        type_k = GGML_TYPE_F16;
    }
    if (ggml_is_quantized(type_v)) {
        type_v = GGML_TYPE_F16;
    }
    const auto buft_of = [&](uint32_t il) {
        return offload ? ggml_backend_dev_buffer_type(model.dev_layer(il)) : ggml_backend_cpu_buffer_type();
    };
    // tail rollback needs every layer's contributions: the CPU op records them, the CUDA decode kernel too
    n_undo = policy.undo_tokens;
    for (uint32_t il = 0; il < hp.n_layer() && n_undo > 0; ++il) {
        ggml_backend_buffer_type_t buft = buft_of(il);
        ggml_backend_dev_t dev = ggml_backend_buft_is_host(buft) ? nullptr : ggml_backend_buft_get_device(buft);
        undo_host = undo_host && !dev;
        if (dev && std::string(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))) != "CUDA") {
            LLAMA_LOG_WARN("%s: %s = %u: heavy-hitter heads on %s cannot take tokens back (CPU and CUDA can); "
                    "ignored\n", __func__, LLAMA_FASTGEN_KEY_UNDO_TOKENS, n_undo, ggml_backend_dev_name(dev));
            n_undo = 0;
        }
    }
    bytes_per_head = (size_t) cap*(ggml_row_size(type_k, hp.n_embd_head_k()) + ggml_row_size(type_v, hp.n_embd_head_v()) + 2*sizeof(float)
                                   + n_undo*LLAMA_FASTGEN_UNDO_BYTES)
                   + GGML_FASTGEN_HH_P_PAD*sizeof(float);
    if (type_k != GGML_TYPE_F16 || type_v != GGML_TYPE_F16) {
        fused_off = format("its K/V cache is %s/%s, the op takes f16", ggml_type_name(type_k), ggml_type_name(type_v));
    } else if (hp.n_embd_head_k() % 32 != 0 || hp.n_embd_head_v() % 2 != 0 || hp.n_embd_head_k() > GGML_FASTGEN_HH_MAX_D) {
        fused_off = format("the model's head size %u is not a multiple of 32 up to %d", hp.n_embd_head_k(), GGML_FASTGEN_HH_MAX_D);
    } else if (cap % 8 != 0 || cap > GGML_FASTGEN_HH_MAX_CELLS) {
        fused_off = format("a head holds %u cells, the op takes a multiple of 8 up to %d", cap, GGML_FASTGEN_HH_MAX_CELLS);
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        n_group = std::max(n_group, hp.n_head(il) / std::max(hp.n_head_kv(il), 1u));
    }

    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;
    auto ctx_for_buft = [&](ggml_backend_buffer_type_t buft) -> ggml_context * {
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params params = { size_t((5u*hp.n_layer() + 3)*ggml_tensor_overhead()), nullptr, true };
            it = ctx_map.emplace(buft, ggml_context_ptr(ggml_init(params))).first;
        }
        return it->second.get();
    };

    // scores and positions of all layers on one buffer type are one tensor each, the layers' views side
    // by side: a ubatch reads the scores back and uploads the positions in one copy, not one per layer
    index.assign(hp.n_layer(), -1);
    std::vector<int32_t> n_h_of(hp.n_layer(), 0);
    std::map<ggml_backend_buffer_type_t, int64_t> heads_of_buft;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        for (int c = c_first; c >= 0 && c <= c_last; ++c) {
            n_h_of[il] += policy.n_heads((int) il, c);
        }
        heads_of_buft[buft_of(il)] += n_h_of[il];
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        const int32_t n_h = n_h_of[il];
        if (n_h == 0) {
            continue;
        }
        ggml_backend_buffer_type_t buft = buft_of(il);
        ggml_context * ctx = ctx_for_buft(buft);
        auto blk = std::find_if(blocks.begin(), blocks.end(), [&](const block & b) { return b.buft == buft; });
        if (blk == blocks.end()) {
            block b;
            b.buft = buft;
            b.s = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cap, heads_of_buft[buft]);
            b.p = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cap + GGML_FASTGEN_HH_P_PAD, heads_of_buft[buft]);
            ggml_format_name(b.s, "cache_fg_hh_s");
            ggml_format_name(b.p, "cache_fg_hh_p");
            if (n_undo > 0) {
                b.u = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, cap, heads_of_buft[buft], n_undo);
                ggml_format_name(b.u, "cache_fg_hh_u");
            }
            b.p_host.assign((size_t) ggml_nelements(b.p), 0.0f);
            blocks.push_back(std::move(b));
            blk = blocks.end() - 1;
        }
        layer l;
        l.il     = (int32_t) il;
        l.n_head = n_h;
        l.blk    = (int32_t) (blk - blocks.begin());
        l.h_blk  = blk->n_placed;
        blk->n_placed += n_h;
        l.k = ggml_new_tensor_3d(ctx, type_k, hp.n_embd_head_k(il), cap, n_h);
        l.v = ggml_new_tensor_3d(ctx, type_v, cap, hp.n_embd_head_v(il), n_h);
        l.s = ggml_view_2d(ctx, blk->s, cap, n_h, blk->s->nb[1], l.h_blk*blk->s->nb[1]);
        l.p = ggml_view_2d(ctx, blk->p, cap + GGML_FASTGEN_HH_P_PAD, n_h, blk->p->nb[1], l.h_blk*blk->p->nb[1]);
        l.u = blk->u ? ggml_view_3d(ctx, blk->u, cap, n_h, n_undo, blk->u->nb[1], blk->u->nb[2], l.h_blk*blk->u->nb[1]) : nullptr;
        ggml_format_name(l.k, "cache_fg_hh_k_l%u", il);
        ggml_format_name(l.v, "cache_fg_hh_v_l%u", il);
        ggml_format_name(l.s, "cache_fg_hh_s_l%u", il);
        ggml_format_name(l.p, "cache_fg_hh_p_l%u", il);
        for (int c = c_first; c <= c_last; ++c) {
            for (int j = 0; j < policy.n_heads((int) il, c); ++j) {
                l.cls.push_back(c);
                l.budget.push_back((uint32_t) policy.classes[c].budget);
                l.window.push_back((uint32_t) policy.classes[c].window);
            }
        }
        l.pos.assign(n_h, std::vector<llama_pos>(cap, -1));
        l.tok.assign(n_h, std::vector<llama_token>(cap, -1));
        l.n_used.assign(n_h, 0);
        l.hint.assign(n_h, 0);
        index[il] = (int32_t) layers.size();
        offsets.push_back(n_heads_all);
        n_heads_all += n_h;
        layers.push_back(std::move(l));
    }
    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            throw std::runtime_error("fastgen: failed to allocate the heavy-hitter cache buffer");
        }
        ggml_backend_buffer_clear(buf, 0);
        ctxs_bufs.emplace_back(std::move(ctx), buf);
    }

    // a layer's store on a device: ask its backend whether it runs the fused op for decode- and
    // prefill-sized ubatches (CUDA: both, prefill where tensor cores and the tiles' shared memory are;
    // other backends: no, so the composed path). The CPU op takes any ubatch. An RPC device answers
    // yes to every op without asking its server (ggml-rpc's supports_op), whose backend may not run
    // the prefill kernels: RPC stores prefill composed, as before, and decode with the op.
    for (size_t li = 0; fused_off.empty() && li < layers.size(); ++li) {
        const layer & l = layers[li];
        if (ggml_backend_buffer_is_host(l.k->buffer)) {
            continue;
        }
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(l.k->buffer));
        const int64_t g = hp.n_head(l.il) / std::max(hp.n_head_kv(l.il), 1u);
        dev_decode  = dev_decode  && dev && op_supported(dev, l, g, 1);
        const bool rpc = dev && std::string(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))).rfind("RPC", 0) == 0; // "RPC[host:port]"
        dev_prefill = dev_prefill && dev && !rpc && op_supported(dev, l, g, GGML_FASTGEN_HH_MAX_ROWS/g + 1);
    }
}

bool llama_fastgen_hh_store::op_supported(ggml_backend_dev_t dev, const layer & l, int64_t n_group, int64_t n_tokens) const {
    ggml_init_params params = { 8*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(params));
    const int64_t D = l.k->ne[0], Dv = l.v->ne[1], n = l.n_head;
    ggml_tensor * q     = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, D, n_group*n, n_tokens);
    ggml_tensor * k_cur = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, D, n, n_tokens);
    ggml_tensor * v_cur = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, Dv, n, n_tokens);
    ggml_tensor * idxs  = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I64, n_tokens, n_heads_all);
    ggml_tensor * qpos  = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, 1, n_tokens, 1, 1);
    ggml_tensor * op = ggml_fastgen_hh_attn(ctx.get(), q, k_cur, v_cur, idxs, l.k, l.v, l.s, l.p, qpos, nullptr, 1.0f,
            offsets[&l - layers.data()], 0);
    return ggml_backend_dev_supports_op(dev, op);
}

static bool fused_env_on() {
    static const bool on = llama_fastgen_env_flag_or_unset(LLAMA_FASTGEN_SWITCH_HH_FUSED); // (the load checked it)
    return on;
}

bool llama_fastgen_hh_store::fused(uint32_t n_tokens) const {
    return fused_env_on() && fused_off.empty() && dev_decode && (n_group*n_tokens <= GGML_FASTGEN_HH_MAX_ROWS || dev_prefill);
}

std::string llama_fastgen_hh_store::why_not_fused(uint32_t n_tokens) const {
    if (fused(n_tokens)) {
        return "";
    }
    if (!fused_env_on()) {
        return "LLAMA_FASTGEN_HH_FUSED turns it off";
    }
    if (!fused_off.empty()) {
        return fused_off;
    }
    return format("the device holding the store does not run it on ubatches of %u tokens (RPC, or a GPU without "
            "its prefill kernels)", n_tokens);
}

// A cell the eviction may remove: special tokens go only when nothing else is left, then the lowest
// mean score, then the oldest. A total order (positions are unique in a head), so the set of the n
// smallest is one set whichever selection algorithm finds it. Packed into one integer, so that the
// selection compares integers: the special bit on top, the score's bits made order-preserving, the
// position (>= 0, < 2^31) below. Scores are >= 0 or -inf (NaN is mapped there), so no -0.0 meets
// +0.0: the order is the one the reference replays.
struct llama_fastgen_hh_cand {
    uint64_t key;
    uint32_t cell;
    bool operator<(const llama_fastgen_hh_cand & o) const { return key < o.key; }
};

static uint64_t hh_cand_key(bool special, float score, llama_pos pos) {
    uint32_t u;
    memcpy(&u, &score, sizeof(u));
    u = u & 0x80000000u ? ~u : u | 0x80000000u;
    return (uint64_t) special << 63 | (uint64_t) u << 31 | (uint32_t) pos;
}

// Threads that outlive a call of hh_parallel_for: a prompt's ubatch evicts from every heavy-hitter head
// while the device waits, and starting the threads anew for each ubatch cost a good part of that wait.
// One job at a time (contexts on several threads take turns); a forked child starts its own threads.
class hh_workers {
public:
    // job() on n_threads threads, this one included; returns when every one has returned
    void run(size_t n_threads, const std::function<void()> & job) {
        std::lock_guard<std::mutex> one_job(run_mu);
        std::unique_lock<std::mutex> lk(mu);
#ifndef _WIN32
        if (pid != getpid()) { // after fork() the threads are the parent's: leave them, start ours
            new std::vector<std::thread>(std::move(threads)); // never destroyed: joining them would hang
            threads.clear();
            pid = getpid();
        }
#endif
        while (threads.size() + 1 < n_threads) {
            const size_t idx = threads.size();
            threads.emplace_back([this, idx] { loop(idx); });
        }
        cur = &job;
        n_want = n_active = n_threads - 1;
        ++gen;
        cv.notify_all();
        lk.unlock();
        job();
        lk.lock();
        done.wait(lk, [this] { return n_active == 0; });
        cur = nullptr;
    }
    ~hh_workers() {
        {
            std::lock_guard<std::mutex> lk(mu);
            stop = true;
        }
        cv.notify_all();
        for (auto & t : threads) {
            t.join();
        }
    }

private:
    void loop(size_t idx) {
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(mu);
        while (true) {
            cv.wait(lk, [&] { return stop || gen != seen; });
            if (stop) {
                return;
            }
            seen = gen;
            if (idx >= n_want) {
                continue; // this job wants fewer threads
            }
            const auto * job = cur;
            lk.unlock();
            (*job)();
            lk.lock();
            if (--n_active == 0) {
                done.notify_one();
            }
        }
    }

    std::mutex run_mu, mu;
    std::condition_variable cv, done;
    std::vector<std::thread> threads;
    const std::function<void()> * cur = nullptr;
    uint64_t gen = 0;
    size_t n_want = 0, n_active = 0;
    bool stop = false;
#ifndef _WIN32
    pid_t pid = getpid();
#endif
};

static hh_workers & hh_pool() {
    static hh_workers workers;
    return workers;
}

// f(i, scratch) for i in [0, n), spread over the workers when there is enough work (a prompt's ubatch
// evicts from and places tokens in every heavy-hitter head at once, hundreds of heads of a few thousand
// cells, while the device waits); each thread has its own scratch
template <typename F>
static void hh_parallel_for(size_t n, size_t work, F && f) {
    const size_t n_threads = work < (1u << 16) ? 1 : std::min<size_t>({ n, 8, std::max(1u, std::thread::hardware_concurrency()) });
    std::atomic<size_t> next{0};
    const auto run = [&]() {
        std::vector<llama_fastgen_hh_cand> scratch;
        for (size_t i; (i = next.fetch_add(1)) < n;) {
            f(i, scratch);
        }
    };
    if (n_threads <= 1) {
        run(); // a decoding step: no std::function, no workers
        return;
    }
    hh_pool().run(n_threads, std::function<void()>(run));
}

// one past a head's last occupied cell: cells [end, cap) are free
static uint32_t occupied_end(const std::vector<llama_pos> & pos) {
    uint32_t end = (uint32_t) pos.size();
    while (end > 0 && pos[end - 1] < 0) {
        --end;
    }
    return end;
}

void llama_fastgen_hh_store::upload_positions() {
    const size_t row = cap + GGML_FASTGEN_HH_P_PAD; // the padding: zero, and hi (ggml-fastgen.h)
    for (size_t b = 0; b < blocks.size(); ++b) {
        auto & blk = blocks[b];
        // one copy from the first dirty layer's rows to the last's; the clean layers between them are
        // rewritten too (the device's positions of new tokens were written by the op, pos has them as well)
        int64_t h_lo = INT64_MAX, h_hi = 0;
        for (const auto & l : layers) {
            if (l.blk == (int32_t) b && l.dirty) {
                h_lo = std::min(h_lo, l.h_blk);
                h_hi = std::max(h_hi, l.h_blk + l.n_head);
            }
        }
        if (h_lo >= h_hi) {
            continue;
        }
        hh_parallel_for(layers.size(), (size_t) (h_hi - h_lo)*cap, [&](size_t li, std::vector<llama_fastgen_hh_cand> &) {
            auto & l = layers[li];
            if (l.blk != (int32_t) b || l.h_blk < h_lo || l.h_blk >= h_hi) {
                return;
            }
            for (int h = 0; h < l.n_head; ++h) {
                float * p = blk.p_host.data() + (l.h_blk + h)*row;
                for (uint32_t i = 0; i < cap; ++i) {
                    p[i] = l.pos[h][i] >= 0 ? (float) l.pos[h][i] - 0.5f : INFINITY;
                }
                p[cap + 1] = (float) occupied_end(l.pos[h]);
            }
            l.dirty = false;
        });
        ggml_backend_tensor_set(blk.p, blk.p_host.data() + h_lo*row, h_lo*row*sizeof(float), (h_hi - h_lo)*row*sizeof(float));
    }
}

uint32_t llama_fastgen_hh_store::max_used(int c) const {
    uint32_t n = 0;
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            n = l.cls[h] == c ? std::max(n, l.n_used[h]) : n;
        }
    }
    return n;
}

size_t llama_fastgen_hh_store::class_bytes(int c) const {
    size_t n = 0;
    for (const auto & l : layers) {
        n += std::count(l.cls.begin(), l.cls.end(), c);
    }
    return n*bytes_per_head;
}

// the eviction trigger: a head holding `used` cells evicts back to its budget before n new tokens
static bool evicts(uint32_t used, uint32_t n, uint32_t budget) {
    return used + n > budget + llama_fastgen_policy::FREQUENT_EVICT_BATCH && used > budget;
}

// a cell the eviction before a query at p0 may remove: occupied, not a sink, behind the head's window
static bool evictable(llama_pos p, llama_pos p0, uint32_t n_sink, uint32_t window) {
    return p >= 0 && p >= (llama_pos) n_sink && p0 - p >= (llama_pos) window;
}

size_t llama_fastgen_hh_store::total_bytes() const {
    size_t n = 0;
    for (const auto & [_, buf] : ctxs_bufs) {
        n += ggml_backend_buffer_get_size(buf.get());
    }
    return n;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_fastgen_hh_store::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> res;
    for (const auto & [_, buf] : ctxs_bufs) {
        res[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
    }
    return res;
}

bool llama_fastgen_hh_store::fits(const std::vector<uint32_t> & n_new) const {
    // replay the eviction trigger per head (eviction itself frees cells, the batch never does)
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            uint32_t used = l.n_used[h];
            for (const uint32_t n : n_new) {
                if (n == 0) {
                    continue; // apply() does not run for a ubatch without this sequence's tokens
                }
                if (evicts(used, n, l.budget[h])) {
                    used = l.budget[h];
                }
                used += n;
                if (used > cap) {
                    return false;
                }
            }
        }
    }
    return true;
}

size_t llama_fastgen_hh_store::evict(layer & l, int h, const float * scores, llama_pos p0, std::vector<llama_fastgen_hh_cand> & cands,
        bool & nan) const {
    auto & pos = l.pos[h];
    auto & tok = l.tok[h];
    cands.clear();
    for (uint32_t i = 0; i < cap; ++i) {
        const llama_pos p = pos[i];
        if (!evictable(p, p0, n_sink, l.window[h])) {
            continue;
        }
        float s = scores[i] / (float) (p0 - p); // mean over the queries p .. p0-1 that saw it
        if (std::isnan(s)) {
            nan = true;
            s = -INFINITY;
        }
        const bool sp = tok[i] >= 0 && (size_t) tok[i] < special.size() && special[tok[i]];
        cands.push_back({ hh_cand_key(sp, s, p), i });
    }
    const size_t n_evict = std::min<size_t>(cands.size(), l.n_used[h] - l.budget[h]);
    // which cells go, not their order: a selection in linear time
    std::nth_element(cands.begin(), cands.begin() + n_evict, cands.end());
    for (size_t j = 0; j < n_evict; ++j) {
        pos[cands[j].cell] = -1;
        tok[cands[j].cell] = -1;
        l.hint[h] = std::min(l.hint[h], cands[j].cell);
    }
    l.n_used[h] -= (uint32_t) n_evict;
    return n_evict;
}

bool llama_fastgen_hh_store::evict_for(uint32_t n, llama_pos p0, ggml_backend_sched_t sched, bool & synced,
        std::chrono::steady_clock::time_point & t) {
    llama_fastgen_timing & timing = llama_fastgen_timing_record(); // LLAMA_FASTGEN_TIMING=1
    // the heads that evict, and their blocks' scores (one read-back per buffer type, not per layer or head)
    std::vector<std::pair<size_t, int>> heads; // (layer, head)
    std::vector<char> read(blocks.size(), 0);
    for (size_t li = 0; li < layers.size(); ++li) {
        auto & l = layers[li];
        for (int h = 0; h < l.n_head; ++h) {
            if (evicts(l.n_used[h], n, l.budget[h])) {
                heads.emplace_back(li, h);
                read[l.blk] = 1;
            }
        }
    }
    for (size_t b = 0; b < blocks.size(); ++b) {
        if (!read[b]) {
            continue;
        }
        if (!synced && sched) {
            // the scores of the previous ubatch may still be computing on an asynchronous backend
            ggml_backend_sched_synchronize(sched);
            synced = true;
            timing.lap(llama_fastgen_timing::WAIT, t);
        }
        blocks[b].s_host.resize((size_t) ggml_nelements(blocks[b].s));
        ggml_backend_tensor_get(blocks[b].s, blocks[b].s_host.data(), 0, ggml_nbytes(blocks[b].s));
    }
    timing.lap(llama_fastgen_timing::READ, t);
    timing.count_ubatch(false, !heads.empty());
    std::vector<size_t> n_evicted(heads.size());
    std::vector<char>   nan(heads.size(), 0);
    hh_parallel_for(heads.size(), heads.size()*cap, [&](size_t i, std::vector<llama_fastgen_hh_cand> & scratch) {
        bool nan_i = false;
        layer & l = layers[heads[i].first];
        n_evicted[i] = evict(l, heads[i].second, blocks[l.blk].s_host.data() + (size_t) (l.h_blk + heads[i].second)*cap,
                p0, scratch, nan_i);
        nan[i] = nan_i;
    });
    bool evicted = false;
    for (size_t i = 0; i < heads.size(); ++i) {
        layers[heads[i].first].dirty = layers[heads[i].first].dirty || n_evicted[i] > 0;
        evicted = evicted || n_evicted[i] > 0;
    }
    if (!warned_nan && std::find(nan.begin(), nan.end(), 1) != nan.end()) {
        LLAMA_LOG_WARN("%s: NaN attention scores (non-finite activations?): those cells are evicted first\n", __func__);
        warned_nan = true;
    }
    timing.lap(llama_fastgen_timing::EVICT, t);
    return evicted;
}

void llama_fastgen_hh_store::evict_ahead(uint32_t n_tokens, ggml_backend_sched_t sched) {
    auto t = std::chrono::steady_clock::now();
    bool synced = false;
    if (evict_for(n_tokens, last_pos + 1, sched, synced, t)) {
        undo_floor = std::max(undo_floor, last_pos + 1); // what follows can still be taken back
    }
}

bool llama_fastgen_hh_store::room_for(const llama_ubatch & ub) const {
    const uint32_t n = ub.n_tokens;
    const llama_pos p0 = ub.pos[0];
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            uint32_t used = l.n_used[h];
            if (used + n > cap && evicts(used, n, l.budget[h])) { // what evict() will free
                const auto & pos = l.pos[h];
                const size_t n_cand = std::count_if(pos.begin(), pos.end(), [&](llama_pos p) {
                    return evictable(p, p0, n_sink, l.window[h]);
                });
                used -= (uint32_t) std::min<size_t>(n_cand, used - l.budget[h]);
            }
            if (used + n > cap) {
                LLAMA_LOG_ERROR("%s: heavy-hitter cache of layer %d head %d is full (%u of %u cells)\n",
                        __func__, l.il, h, used, cap);
                return false;
            }
        }
    }
    return true;
}

bool llama_fastgen_hh_store::apply(const llama_ubatch & ub, ggml_backend_sched_t sched) {
    pending_n = 0;
    if (!fused(ub.n_tokens)) {
        return commit(ub, sched);
    }
    if (!room_for(ub)) {
        return false;
    }
    n_active   = cap;
    pending_n  = ub.n_tokens;
    pending_p0 = ub.pos[0];
    return true;
}

void llama_fastgen_hh_store::place(const llama_ubatch & ub, ggml_backend_sched_t sched) {
    if (pending_n == 0) {
        return; // apply() committed it (composed), or it is placed
    }
    GGML_ASSERT(pending_n == ub.n_tokens && pending_p0 == ub.pos[0]); // the ubatch apply() took
    pending_n = 0;
    const bool ok = commit(ub, sched);
    GGML_ASSERT(ok); // room_for() said it fits
}

bool llama_fastgen_hh_store::commit(const llama_ubatch & ub, ggml_backend_sched_t sched) {
    const uint32_t n = ub.n_tokens;
    const llama_pos p0 = ub.pos[0];
    auto t = std::chrono::steady_clock::now();
    bool synced = false;
    llama_fastgen_timing & timing = llama_fastgen_timing_record(); // LLAMA_FASTGEN_TIMING=1
    timing.count_ubatch(true, false);
    const bool evicted = evict_for(n, p0, sched, synced, t);

    // per decoding step only O(heads) host work: slots from a hint, keep and positions for
    // composed ubatches only
    const bool fz = fused(n);
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            if (l.n_used[h] + n > cap) {
                LLAMA_LOG_ERROR("%s: heavy-hitter cache of layer %d head %d is full (%u of %u cells)\n",
                        __func__, l.il, h, l.n_used[h], cap);
                return false;
            }
        }
    }
    std::vector<uint32_t> hi_l(layers.size(), 0); // cells [0, hi) hold every token after this ubatch, per layer
    hh_parallel_for(layers.size(), (size_t) n*n_heads_all,
            [&](size_t li, std::vector<llama_fastgen_hh_cand> &) {
        auto & l = layers[li];
        l.slots.resize((size_t) l.n_head*n);
        if (!fz) {
            l.keep.resize((size_t) l.n_head*cap);
        }
        for (int h = 0; h < l.n_head; ++h) {
            auto & pos = l.pos[h];
            if (!fz) {
                for (uint32_t i = 0; i < cap; ++i) {
                    l.keep[(size_t) h*cap + i] = pos[i] >= 0 ? 1.0f : 0.0f;
                }
            }
            uint32_t cell = l.hint[h];
            for (uint32_t t = 0; t < n; ++t) {
                while (pos[cell] >= 0) {
                    ++cell;
                }
                pos[cell]   = ub.pos[t];
                l.tok[h][cell] = ub.token ? ub.token[t] : -1;
                l.slots[(size_t) h*n + t] = cell;
                if (!fz) {
                    l.keep[(size_t) h*cap + cell] = 0.0f; // a reused cell starts from score 0
                }
            }
            l.hint[h] = cell;
            l.n_used[h] += n;
            if (!fz) {
                hi_l[li] = std::max(hi_l[li], occupied_end(pos));
            }
        }
        if (!fz) {
            l.dirty = true; // the composed graph reads positions from an input, not from l.p
        }
    });
    const uint32_t hi = *std::max_element(hi_l.begin(), hi_l.end());
    // a composed ubatch attends over the occupied prefix only: while the store fills (a prompt's
    // first ubatches, or a context larger than the prompt) the free cells behind it cost nothing
    n_active = fz ? cap : std::min(cap, GGML_PAD(hi, 128));
    if (fz && std::any_of(layers.begin(), layers.end(), [](const layer & l) { return l.dirty; })) {
        if (!synced && sched) {
            timing.lap(llama_fastgen_timing::PLACE, t);
            ggml_backend_sched_synchronize(sched); // the positions may be in use by the last graph
            synced = true;
            timing.lap(llama_fastgen_timing::WAIT, t);
        }
        upload_positions();
    }
    const bool recorded = records(n);
    if (undo_host && recorded) {
        // The ubatch's slots start from 0. The CPU op fills them layer by layer, so a compute that stops
        // early (an abort between graph nodes) leaves 0 in the layers it did not reach instead of an older
        // token's attention, and llama.cpp's removal of the failed ubatch takes out exactly what ran.
        for (auto & blk : blocks) {
            for (uint32_t t = 0; blk.u && t < n; ++t) {
                ggml_backend_tensor_memset(blk.u, 0, (size_t) (ub.pos[t] % (llama_pos) n_undo)*blk.u->nb[2], blk.u->nb[2]);
            }
        }
    }
    // A recorded ubatch can be taken back even when its eviction ran (before its tokens were placed, from
    // the scores before it): the eviction stays, as if make_removable had run it ahead, and the cells it
    // freed take the next tokens. What came before an eviction cannot be taken back.
    last_pos = std::max(last_pos, ub.pos[n - 1]);
    if (!recorded) {
        undo_floor = last_pos + 1; // this ubatch cannot be taken back
    } else if (evicted) {
        undo_floor = std::max(undo_floor, p0);
    }
    timing.lap(llama_fastgen_timing::PLACE, t);
    if (synced) {
        timing.device_idle(t);
    }
    return true;
}

bool llama_fastgen_hh_store::records(uint32_t n_tokens) const {
    // the CPU op (ggml-fastgen-cpu.cpp) keeps each token's contribution, the CUDA decode kernel too
    return n_undo > 0 && n_tokens <= n_undo && fused(n_tokens) && (undo_host || n_group*n_tokens <= GGML_FASTGEN_HH_MAX_ROWS);
}

bool llama_fastgen_hh_store::can_undo(llama_pos p0) const {
    return p0 > last_pos || (n_undo > 0 && p0 >= undo_floor && p0 + (llama_pos) n_undo > last_pos);
}

void llama_fastgen_hh_store::undo(llama_pos p0, ggml_backend_sched_t sched) {
    GGML_ASSERT(can_undo(p0));
    if (p0 > last_pos) {
        return;
    }
    if (sched) {
        ggml_backend_sched_synchronize(sched); // the last ubatch's scores may still be computing
    }
    for (auto & blk : blocks) {
        blk.s_host.resize((size_t) ggml_nelements(blk.s));
        blk.u_host.resize((size_t) ggml_nelements(blk.u));
        ggml_backend_tensor_get(blk.s, blk.s_host.data(), 0, ggml_nbytes(blk.s));
        for (llama_pos q = p0; q <= last_pos; ++q) { // only the removed tokens' slots
            const size_t off = (size_t) (q % (llama_pos) n_undo)*blk.u->nb[2];
            ggml_backend_tensor_get(blk.u, (char *) blk.u_host.data() + off, off, blk.u->nb[2]);
        }
    }
    hh_parallel_for(layers.size(), (size_t) n_heads_all*cap*(last_pos + 1 - p0), [&](size_t li, std::vector<llama_fastgen_hh_cand> &) {
        layer & l = layers[li];
        block & blk = blocks[l.blk];
        const int64_t heads = blk.s->ne[1];
        for (int h = 0; h < l.n_head; ++h) {
            float * s = blk.s_host.data() + (size_t) (l.h_blk + h)*cap;
            for (llama_pos q = p0; q <= last_pos; ++q) { // the removed queries' attention leaves the scores
                const float * u = blk.u_host.data() + ((size_t) (q % (llama_pos) n_undo)*heads + l.h_blk + h)*cap;
                for (uint32_t c = 0; c < cap; ++c) {
                    s[c] -= u[c];
                }
            }
            for (uint32_t c = 0; c < cap; ++c) { // and their cells are free again
                if (l.pos[h][c] >= p0) {
                    l.pos[h][c] = -1;
                    l.tok[h][c] = -1;
                    l.n_used[h]--;
                    l.hint[h] = std::min(l.hint[h], c);
                }
            }
        }
        l.dirty = true;
    });
    for (auto & blk : blocks) {
        ggml_backend_tensor_set(blk.s, blk.s_host.data(), 0, ggml_nbytes(blk.s));
    }
    last_pos = p0 - 1;
    upload_positions();
}

void llama_fastgen_hh_store::set_input_idxs(ggml_tensor * dst, uint32_t t0) const {
    const int64_t row = dst->ne[0]; // the ubatch's tokens; this store's are [t0, t0 + n)
    auto * out = (int64_t *) dst->data + t0;
    for (const auto & l : layers) {
        const size_t n = l.slots.size()/l.n_head;
        GGML_ASSERT(t0 + n <= (size_t) row);
        for (int h = 0; h < l.n_head; ++h) {
            std::memcpy(out, l.slots.data() + h*n, n*sizeof(int64_t));
            out += row;
        }
    }
}

void llama_fastgen_hh_store::set_input_keep(ggml_tensor * dst) const {
    GGML_ASSERT(dst->ne[0] == n_active);
    auto * out = (float *) dst->data;
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            std::memcpy(out, l.keep.data() + (size_t) h*cap, n_active*sizeof(float));
            out += n_active;
        }
    }
}

void llama_fastgen_hh_store::set_input_cell_pos(ggml_tensor * dst) const {
    // a query at q sees a cell at p iff q - (p - 0.5) > 0: step() then log() gives 0 or -inf
    GGML_ASSERT(dst->ne[0] == n_active);
    auto * out = (float *) dst->data;
    for (const auto & l : layers) {
        for (const auto & pos : l.pos) {
            for (uint32_t i = 0; i < n_active; ++i) {
                *out++ = pos[i] >= 0 ? (float) pos[i] - 0.5f : INFINITY;
            }
        }
    }
}

void llama_fastgen_hh_store::set_input_query_pos(ggml_tensor * dst, const llama_ubatch & ub) {
    auto * out = (float *) dst->data;
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        out[t] = (float) ub.pos[t];
    }
}

void llama_fastgen_hh_store::clear() {
    for (auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            std::fill(l.pos[h].begin(), l.pos[h].end(), -1);
            std::fill(l.tok[h].begin(), l.tok[h].end(), -1);
            l.n_used[h] = 0;
            l.hint[h] = 0;
        }
        l.dirty = true;
    }
    last_pos = -1;
    undo_floor = 0;
    pending_n = 0;
}

void llama_fastgen_hh_store::copy_from(const llama_fastgen_hh_store & src, ggml_backend_sched_t sched) {
    GGML_ASSERT(src.cap == cap && src.layers.size() == layers.size());
    if (sched) {
        ggml_backend_sched_synchronize(sched); // the source's tensors may still be computing
    }
    for (size_t li = 0; li < layers.size(); ++li) {
        layer & l = layers[li];
        const layer & r = src.layers[li];
        ggml_backend_tensor_copy(r.k, l.k);
        ggml_backend_tensor_copy(r.v, l.v);
        ggml_backend_tensor_copy(r.s, l.s);
        ggml_backend_tensor_copy(r.p, l.p);
        l.pos = r.pos;
        l.tok = r.tok;
        l.n_used = r.n_used;
        l.hint = r.hint;
        l.dirty = true;
    }
    last_pos = src.last_pos;
    undo_floor = last_pos + 1; // the contributions stay with the source
    pending_n = 0;
}

void llama_fastgen_hh_store::state_write(llama_io_write_i & io) const {
    const uint32_t n_layer = layers.size();
    io.write(&cap, sizeof(cap));
    io.write(&n_layer, sizeof(n_layer));
    io.write(&last_pos, sizeof(last_pos));
    for (const auto & l : layers) {
        for (int h = 0; h < l.n_head; ++h) {
            io.write(&l.n_used[h], sizeof(uint32_t));
            io.write(l.pos[h].data(), cap*sizeof(llama_pos));
            io.write(l.tok[h].data(), cap*sizeof(llama_token));
        }
        for (ggml_tensor * t : { l.k, l.v, l.s }) {
            io.write_tensor(t, 0, ggml_nbytes(t));
        }
    }
}

void llama_fastgen_hh_store::state_read(llama_io_read_i & io) {
    // Everything read is checked before it is used (cell counts, positions, token ids index arrays);
    // on any error the store is left empty (the caller clears the rest of the cache).
    try {
        uint32_t cap_r = 0, n_layer_r = 0;
        io.read(&cap_r, sizeof(cap_r));
        io.read(&n_layer_r, sizeof(n_layer_r));
        if (cap_r != cap || n_layer_r != layers.size()) {
            throw std::runtime_error(format("fastgen: saved heavy-hitter state has %u cells x %u layers, this context "
                    "%u x %zu: restore into a context with the same n_ctx and n_ubatch", cap_r, n_layer_r, cap, layers.size()));
        }
        llama_pos last = -1;
        io.read(&last, sizeof(last));
        if (last < -1) {
            throw std::runtime_error(format("fastgen: corrupt heavy-hitter state (last position %d)", last));
        }
        llama_pos newest = -1; // every head keeps the newest token (its window), so this is `last`
        for (auto & l : layers) {
            for (int h = 0; h < l.n_head; ++h) {
                uint32_t n = 0;
                io.read(&n, sizeof(n));
                io.read(l.pos[h].data(), cap*sizeof(llama_pos));
                io.read(l.tok[h].data(), cap*sizeof(llama_token));
                uint32_t used = 0;
                for (uint32_t i = 0; i < cap; ++i) {
                    const llama_pos p = l.pos[h][i];
                    // token -1: the cell came from an embedding input (apply() stores no token then)
                    if (p < -1 || p > last || (p >= 0 && (l.tok[h][i] < -1 || l.tok[h][i] >= (llama_token) special.size()))) {
                        throw std::runtime_error(format("fastgen: corrupt heavy-hitter state (layer %d head %d cell %u: "
                                "position %d, token %d)", l.il, h, i, p, l.tok[h][i]));
                    }
                    used += p >= 0;
                    newest = std::max(newest, p);
                }
                if (n != used) {
                    throw std::runtime_error(format("fastgen: corrupt heavy-hitter state (layer %d head %d: %u cells "
                            "said used, %u hold a position)", l.il, h, n, used));
                }
                l.n_used[h] = n;
            }
            for (ggml_tensor * t : { l.k, l.v, l.s }) {
                io.read_tensor(t, 0, ggml_nbytes(t));
            }
            for (int h = 0; h < l.n_head; ++h) {
                l.hint[h] = 0;
            }
            l.dirty = true;
        }
        if (newest != last) {
            throw std::runtime_error(format("fastgen: corrupt heavy-hitter state (last position %d, newest cell %d)", last, newest));
        }
        last_pos = last;
        undo_floor = last_pos + 1; // a saved state has no contributions
        pending_n = 0;
    } catch (...) {
        clear();
        throw;
    }
}

//
// llama_fastgen_hh_memory
//

std::vector<llama_fastgen_hh_store *> llama_fastgen_hh_memory::stores_of(llama_seq_id seq_id) const {
    std::vector<llama_fastgen_hh_store *> res;
    for (llama_seq_id s = 0; s < (llama_seq_id) stores.size(); ++s) {
        if (seq_id < 0 || s == seq_id) {
            res.push_back(stores[s].get());
        }
    }
    return res;
}

bool llama_fastgen_hh_memory::takes_seqs(const std::vector<llama_ubatch> & ubatches) const {
    for (const auto & ub : ubatches) {
        for (uint32_t i = 0; !stores.empty() && i < ub.n_tokens; ++i) {
            const llama_seq_id s = ub.seq_id[i][0];
            if (ub.n_seq_id[i] != 1 || s < 0 || (size_t) s >= stores.size()) {
                llama_fastgen_refuse("init_batch", format("a token of several sequences (or of sequence %d) with heavy-hitter "
                        "heads: their cells are per sequence; give each token one sequence below n_seq_max", s));
                return false;
            }
        }
    }
    return true;
}

bool llama_fastgen_hh_memory::fits(const std::vector<llama_ubatch> & ubatches) const {
    std::vector<std::vector<uint32_t>> n_new(stores.size(), std::vector<uint32_t>(ubatches.size(), 0));
    for (size_t u = 0; u < ubatches.size() && !stores.empty(); ++u) {
        for (uint32_t i = 0; i < ubatches[u].n_tokens; ++i) {
            n_new[ubatches[u].seq_id[i][0]][u]++; // in range: takes_seqs() ran first
        }
    }
    for (size_t s = 0; s < stores.size(); ++s) {
        if (!stores[s]->fits(n_new[s])) {
            llama_fastgen_refuse("init_batch", format("the heavy-hitter store (%u cells per head) cannot take this batch; "
                    "use a smaller n_ubatch", stores[s]->get_size()));
            return false;
        }
    }
    return true;
}

bool llama_fastgen_hh_memory::apply(const llama_ubatch & ub) {
    bool res = true;
    for (uint32_t g = 0; !stores.empty() && g < hh_n_groups(ub); ++g) {
        res = stores[hh_group_seq(ub, g)]->apply(hh_group(ub, g), sched) && res;
    }
    return res;
}

void llama_fastgen_hh_memory::place(const llama_ubatch & ub) {
    for (uint32_t g = 0; !stores.empty() && g < hh_n_groups(ub); ++g) {
        stores[hh_group_seq(ub, g)]->place(hh_group(ub, g), sched);
    }
}

void llama_fastgen_hh_memory::clear() {
    seq_rm(-1);
}

void llama_fastgen_hh_memory::seq_rm(llama_seq_id seq_id) {
    for (auto * st : stores_of(seq_id)) {
        st->clear();
    }
}

bool llama_fastgen_hh_memory::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    if (stores.empty()) {
        return true;
    }
    // llama-server copies a prompt's sequence for several completions: store to store; a part of one cannot be
    if (src < 0 || dst < 0 || (size_t) src >= stores.size() || (size_t) dst >= stores.size() ||
            p0 > 0 || (p1 >= 0 && p1 <= stores[src]->pos_max())) {
        llama_fastgen_refuse(__func__, format("fastgen: heavy-hitter heads copy whole sequences only "
                "(seq_cp(%d, %d, %d, %d)); sequence %d unchanged", src, dst, p0, p1, dst));
        return false;
    }
    stores[dst]->copy_from(*stores[src], sched);
    return true;
}

void llama_fastgen_hh_memory::seq_keep(llama_seq_id seq_id) {
    for (llama_seq_id s = 0; s < (llama_seq_id) stores.size(); ++s) {
        if (s != seq_id) {
            stores[s]->clear();
        }
    }
}

llama_pos llama_fastgen_hh_memory::seq_pos_max(llama_seq_id seq_id) const {
    llama_pos res = -1;
    for (const auto * st : stores_of(seq_id)) {
        res = std::max(res, st->pos_max());
    }
    return res;
}

bool llama_fastgen_hh_memory::can_undo(llama_seq_id seq_id, llama_pos p0) const {
    return every(seq_id, [&](const llama_fastgen_hh_store * st) { return st->can_undo(p0); });
}

void llama_fastgen_hh_memory::undo(llama_seq_id seq_id, llama_pos p0) {
    for (auto * st : stores_of(seq_id)) {
        st->undo(p0, sched);
    }
}

bool llama_fastgen_hh_memory::records(llama_seq_id seq_id, uint32_t n_tokens) const {
    return every(seq_id, [&](const llama_fastgen_hh_store * st) { return st->records(n_tokens); });
}

void llama_fastgen_hh_memory::evict_ahead(llama_seq_id seq_id, uint32_t n_tokens) {
    for (auto * st : stores_of(seq_id)) {
        st->evict_ahead(n_tokens, sched);
    }
}

uint32_t llama_fastgen_hh_memory::max_used(int c) const {
    uint32_t n = 0;
    for (const auto & st : stores) {
        n = std::max(n, st->max_used(c));
    }
    return n;
}

size_t llama_fastgen_hh_memory::class_bytes(int c) const {
    return stores.empty() ? 0 : stores.size()*stores[0]->class_bytes(c);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_fastgen_hh_memory::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> res;
    for (const auto & st : stores) {
        for (const auto & [buft, size] : st->memory_breakdown()) {
            res[buft] += size;
        }
    }
    return res;
}

// the stores a state holds are counted first: a whole state (seq_id < 0) has one per sequence of the
// context that saved it, which the fingerprint does not cover (n_seq_max may differ between contexts)
void llama_fastgen_hh_memory::state_write(llama_io_write_i & io, llama_seq_id seq_id) const {
    const auto sts = stores_of(seq_id);
    const uint32_t n = (uint32_t) sts.size();
    io.write(&n, sizeof(n));
    for (const auto * st : sts) {
        st->state_write(io);
    }
}

void llama_fastgen_hh_memory::state_read(llama_io_read_i & io, llama_seq_id seq_id) {
    const auto sts = stores_of(seq_id);
    uint32_t n = 0;
    io.read(&n, sizeof(n));
    if (n != sts.size()) {
        throw std::runtime_error(seq_id < 0
            ? format("fastgen: the saved state holds %u sequences' heavy-hitter cells, this context has %zu: restore a "
                     "whole state into a context with the same n_seq_max (or save and restore one sequence)", n, sts.size())
            : format("fastgen: corrupt saved state (%u heavy-hitter stores for sequence %d)", n, seq_id));
    }
    for (auto * st : sts) {
        st->state_read(io);
    }
}

uint32_t hh_n_groups(const llama_ubatch & ub) {
    return ub.n_seqs_unq > 1 ? ub.n_seqs : 1;
}

llama_seq_id hh_group_seq(const llama_ubatch & ub, uint32_t g) {
    const uint32_t t = g*(ub.n_tokens/hh_n_groups(ub));
    if (ub.n_tokens > 0 && ub.seq_id && ub.seq_id[t]) {
        return ub.seq_id[t][0];
    }
    return ub.seq_id_unq && g < ub.n_seqs_unq ? ub.seq_id_unq[g] : 0; // a reserve ubatch has no per-token ids
}

llama_ubatch hh_group(const llama_ubatch & ub, uint32_t g) {
    llama_ubatch r = ub;
    const uint32_t n = ub.n_tokens/hh_n_groups(ub), t0 = g*n;
    r.n_tokens = n;
    r.pos   = ub.pos + t0;
    r.token = ub.token ? ub.token + t0 : nullptr;
    return r;
}
