#!/usr/bin/env bash
# llama.cpp's own tools on our libllama (the pinned tree with native/patches and native/ compiled in, as the
# package builds it), for the serving checks: llama-server (its web UI left out: the build stays offline),
# ggml-rpc-server and llama-perplexity (with the RPC backend). Incremental in $TOOLS_BUILD.
#   scripts/build_tools.sh TARGET...        e.g. scripts/build_tools.sh llama-server
# Prints the folder holding the binaries and libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${TOOLS_BUILD:-.cache/build-rpc}
[ $# -gt 0 ] || { echo "usage: scripts/build_tools.sh TARGET..." >&2; exit 2; }
{
    cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
          -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
    cmake --build "$B" -j "$(nproc)" --target "$@"
} > "$B.log" 2>&1 || { tail -30 "$B.log" >&2; echo "building $* failed (log: $B.log)" >&2; exit 1; }
echo "$B/bin"
