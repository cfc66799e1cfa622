#!/usr/bin/env bash
# On the GPU machine (device tool): the same measurement on several commits, one machine, one call. Each archive
# (scripts/pack_gpu.sh --commits REV...: .gpu/src-ID.tar) is built in turn by gpu_build.sh into the same build folder,
# which recompiles only what differs from the last one, and then COMMAND runs from the built tree with TAG (the
# commit's id) and BENCH (its llama-bench) set. A/B/A (repeat the first archive) shows the drift between runs.
#   scripts/gpu_ab.sh .gpu/src-A.tar .gpu/src-B.tar [.gpu/src-A.tar] -- COMMAND...
# e.g. -- bash -c 'python3 scripts/bench_gpu.py speed --model M --llama-bench $BENCH --depths 0 512 --no-prefill
#                  --configs "fastgen f16" "full f16" --json $OUT/speed-$TAG-$RUN.json'   (RUN: 1, 2, ... per archive)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tars=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tars+=("$1"); shift; done
[ $# -gt 1 ] && [ ${#tars[@]} -gt 0 ] || { echo "usage: scripts/gpu_ab.sh A.tar [B.tar ...] -- COMMAND..." >&2; exit 2; }
shift
run=0
for t in "${tars[@]}"; do
    run=$((run + 1))
    [ -f "$ROOT/$t" ] || { echo "gpu_ab.sh: no $t under $ROOT" >&2; exit 2; }
    ( # a subshell: gpu_build.sh changes folder and shell options
        cd "$ROOT"
        GPU_SRC_TAR="$t" GPU_TARGETS="llama-bench ${GPU_TARGETS:-}" source scripts/gpu_build.sh
        set +e
        TAG="$LLAMA_FASTGEN_COMMIT" RUN=$run BENCH="$(find /tmp/build -name llama-bench -type f | head -1)" "$@"
    ) || echo "gpu_ab.sh: $t: failed (status $?)" >&2
done
