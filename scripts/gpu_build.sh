#!/usr/bin/env bash
# Sourced on the GPU machine (device tool, no registry) by gpu_run.sh and gpu_eval.sh: unpack the
# carried pinned tree and wheels (scripts/pack_gpu.sh), build libllama with CUDA for sm_90 (plus
# GPU_TARGETS), and stage llama_fastgen like an installed wheel under /tmp/site. A warm machine
# keeps /tmp, so a second call rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
# .gpu/src.tar (pack_gpu.sh: git archive of a commit; GPU_SRC_TAR names another, as gpu_ab.sh does): build and run
# exactly that commit from /tmp/src, not the copied working tree (which carries whatever is uncommitted, a helper's
# half-done edit too); results then record its id. Without it, the working tree as copied.
SRC_TAR="${GPU_SRC_TAR:-.gpu/src.tar}"
if [ -f "$SRC_TAR" ] && [ "$PWD" != /tmp/src ]; then
    export LLAMA_FASTGEN_COMMIT="$(python3 -c 'import sys, tarfile; print(tarfile.open(sys.argv[1]).pax_headers.get("comment", "unknown")[:12])' "$SRC_TAR")"
    rm -rf /tmp/src.new && mkdir /tmp/src.new && tar -C /tmp/src.new -xf "$SRC_TAR" && cp -r .gpu /tmp/src.new/
    # keep /tmp/src's timestamps where the files did not change, so a warm machine rebuilds only those; a changed
    # file gets the time of this copy (not the archive's, the commit's: older than the last build's objects, so
    # ninja would not rebuild it)
    mkdir -p /tmp/src && (cd /tmp/src.new && find . -type f) | while read -r f; do
        cmp -s "/tmp/src.new/$f" "/tmp/src/$f" || { mkdir -p "$(dirname "/tmp/src/$f")"; cp "/tmp/src.new/$f" "/tmp/src/$f"; }
    done
    (cd /tmp/src && find . -type f) | while read -r f; do [ -e "/tmp/src.new/$f" ] || rm -f "/tmp/src/$f"; done
    cd /tmp/src
    echo "building commit $LLAMA_FASTGEN_COMMIT from $SRC_TAR"
fi
export LLAMA_FASTGEN_CACHE=/tmp/fgcache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
PIN=$(python3 native/llama_cpp_tree.py commit)   # the llama.cpp commit pinned by llama-cpp-python 0.3.36
if [ -f .gpu/base/tree.tar.xz ] && [ ! -d $LLAMA_FASTGEN_CACHE/pristine-$PIN ]; then
    mkdir -p $LLAMA_FASTGEN_CACHE && tar -C $LLAMA_FASTGEN_CACHE -xJf .gpu/base/tree.tar.xz
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/base/*.whl
fi
t0=$(date +%s)
cmake -S . -B /tmp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON > "$OUT/build.log" 2>&1
cmake --build /tmp/build -j 16 --target llama ${GPU_TARGETS:-} >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "CUDA build: $(( $(date +%s) - t0 )) s"
mkdir -p /tmp/site/llama_fastgen/lib /tmp/site/llama_fastgen/converter
cp -r plugin/* native/include/llama-fastgen-contract.h native/include/llama-fastgen.h /tmp/site/llama_fastgen/ && cp -r converter/* /tmp/site/llama_fastgen/converter/
find /tmp/build -name 'lib*.so*' -exec cp -P {} /tmp/site/llama_fastgen/lib/ \;
T=$LLAMA_FASTGEN_CACHE/patched-$PIN   # the pinned HF->GGUF converter, as CMakeLists.txt installs it
mkdir -p /tmp/site/llama_fastgen/llama_cpp_convert && cp -r $T/convert_hf_to_gguf.py $T/conversion $T/gguf-py /tmp/site/llama_fastgen/llama_cpp_convert/
python3 -m llama_fastgen --version
