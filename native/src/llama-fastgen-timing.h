#pragma once
// LLAMA_FASTGEN_TIMING=1: the host time the fastgen cache adds, summed over the process and printed at its
// exit (llama_fastgen.evaluation.report parses the lines for the tests, scripts/bench_gpu.py host and
// scripts/bench_masks.py: keep their wording).
//  - per applied ubatch of the heavy-hitter stores: waiting for the device, reading scores back, evicting,
//    placing the new tokens and uploading (the device idles during everything after the wait);
//  - per applied ubatch that waited for the device: the host time from the end of the stores' work to the end
//    of the fastgen graph input's set_input, the device still idle: for a composed ubatch (the stores run at
//    its start) llama.cpp's graph build and allocation, the inputs before ours, our indices and masks, all of
//    which the stock cache overlaps with the device's previous ubatch; for a fused one (the stores run from
//    set_input, after the build) only the heavy-hitter indices;
//  - per decode step: the full classes' masks, filled over every cell or updated from the last step's.

#include <chrono>
#include <cstddef>
#include <cstdint>

struct llama_fastgen_timing {
    enum phase { WAIT, READ, EVICT, PLACE, AFTER_WAIT, MASK_FILL, MASK_UPDATE, N_PHASE };
    using clock = std::chrono::steady_clock;

    const bool on;
    double   ms[N_PHASE] = {};
    uint64_t n[N_PHASE]  = {};  // laps; MASK_*: one per mask (a store phase can lap twice in a ubatch)
    size_t   n_apply = 0, n_evicting = 0; // ubatches the stores applied, and those that evicted
    bool              idle = false;       // the stores waited for the device and ended at idle_since
    clock::time_point idle_since;

    llama_fastgen_timing();
    ~llama_fastgen_timing();

    // counts a ubatch of the stores (nothing when off: contexts on several threads would race on the counts)
    void count_ubatch(bool applied, bool evicting) {
        if (on) {
            n_apply    += applied;
            n_evicting += evicting;
        }
    }
    // the stores are done with a ubatch for which they waited for the device (t: now)
    void device_idle(const clock::time_point & t) {
        if (on) {
            idle = true;
            idle_since = t;
        }
    }
    // the fastgen graph input has set a ubatch's inputs: AFTER_WAIT takes the time since device_idle
    void inputs_set() {
        if (idle) { // only ever set when on
            lap(AFTER_WAIT, idle_since);
            idle = false;
        }
    }
    // adds the time since t to phase p and restarts t (nothing when off)
    void lap(phase p, clock::time_point & t) {
        if (on) {
            const auto now = clock::now();
            ms[p] += std::chrono::duration<double, std::milli>(now - t).count();
            n[p]++;
            t = now;
        }
    }
};

// the process's one record
llama_fastgen_timing & llama_fastgen_timing_record();
