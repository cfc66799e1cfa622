// A kernel timeline where Nsight Systems is missing (the GPU machine has ncu but no nsys): preloaded into any CUDA
// program, CUPTI's activity API records every kernel's start and end on the GPU's clock, CUDA graphs' kernels
// included, without serializing them (CONCURRENT_KERNEL). One line per kernel into $GPU_TIMELINE_OUT:
//     start_ns end_ns stream graph_id grid_x grid_y grid_z demangled-name
// and, on the same clock, every CUDA runtime call on the host (how long the caller spent in it) and every copy:
//     api start_ns end_ns thread_id name
//     memcpy start_ns end_ns stream bytes copy_kind graph_id
// scripts/gpu_timeline.py reads it. Build (on the GPU machine; CUPTI ships with the toolkit):
//     g++ -std=c++17 -shared -fPIC -O2 -I$CUDA/include -I$CUDA/extras/CUPTI/include scripts/gpu_timeline.cpp \
//         -o /tmp/gpu_timeline.so -L<dir of libcupti.so> -lcupti
// Run: GPU_TIMELINE_OUT=/tmp/t.txt LD_PRELOAD=/tmp/gpu_timeline.so llama-bench ...
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace {

FILE * g_out = nullptr;
std::mutex g_mu;

void check(CUptiResult r, const char * what) {
    if (r != CUPTI_SUCCESS) {
        const char * s = nullptr;
        cuptiGetResultString(r, &s);
        fprintf(stderr, "gpu_timeline: %s failed: %s\n", what, s ? s : "?");
    }
}

void CUPTIAPI buffer_requested(uint8_t ** buf, size_t * size, size_t * max_records) {
    *size = 8u << 20;
    *buf = (uint8_t *) aligned_alloc(8, *size);
    *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t * buf, size_t, size_t valid) {
    std::lock_guard<std::mutex> lock(g_mu);
    CUpti_Activity * rec = nullptr;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME && g_out) {
            const auto * a = (const CUpti_ActivityAPI *) rec;
            const char * name = nullptr;
            if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name) != CUPTI_SUCCESS || !name) {
                name = "?";
            }
            fprintf(g_out, "api %llu %llu %u %s\n", (unsigned long long) a->start, (unsigned long long) a->end, a->threadId, name);
            continue;
        }
        if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY && g_out) {
            const auto * m = (const CUpti_ActivityMemcpy6 *) rec;
            fprintf(g_out, "memcpy %llu %llu %u %llu %u %u\n", (unsigned long long) m->start, (unsigned long long) m->end,
                    m->streamId, (unsigned long long) m->bytes, (unsigned) m->copyKind, m->graphId);
            continue;
        }
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) {
            continue;
        }
        const auto * k = (const CUpti_ActivityKernel10 *) rec;
        int st = 0;
        char * dm = abi::__cxa_demangle(k->name, nullptr, nullptr, &st);
        const char * name = st == 0 && dm ? dm : k->name;
        if (g_out) {
            // the name last: demangled names hold spaces
            fprintf(g_out, "%llu %llu %u %u %d %d %d %s\n", (unsigned long long) k->start, (unsigned long long) k->end,
                    k->streamId, k->graphId, k->gridX, k->gridY, k->gridZ, name);
        }
        free(dm);
    }
    size_t dropped = 0;
    cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
    if (dropped) {
        fprintf(stderr, "gpu_timeline: %zu records dropped\n", dropped);
    }
    free(buf);
}

void finish() {
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_out) {
        fclose(g_out);
        g_out = nullptr;
    }
}

__attribute__((constructor)) void start() {
    const char * path = getenv("GPU_TIMELINE_OUT");
    if (!path) {
        return;
    }
    g_out = fopen(path, "w");
    if (!g_out) {
        fprintf(stderr, "gpu_timeline: cannot write %s\n", path);
        return;
    }
    check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME), "cuptiActivityEnable(RUNTIME)");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "cuptiActivityEnable(MEMCPY)");
    atexit(finish);
}

} // namespace
