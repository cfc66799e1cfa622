#!/usr/bin/env bash
# Sourced on the GPU machine (device tool, no registry) by gpu_run.sh and gpu_eval.sh: unpack the
# carried pinned tree and wheels (scripts/pack_gpu.sh), build libllama with CUDA for sm_90 (plus
# GPU_TARGETS), and stage llama_fastgen like an installed wheel under /tmp/site. A warm machine
# keeps /tmp, so a second call rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export LLAMA_FASTGEN_CACHE=/tmp/fgcache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
if [ -f .gpu/base/tree.tar.xz ] && [ ! -d $LLAMA_FASTGEN_CACHE/pristine-0c1e57098 ]; then
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
T=$LLAMA_FASTGEN_CACHE/patched-0c1e57098   # the pinned HF->GGUF converter, as CMakeLists.txt installs it
mkdir -p /tmp/site/llama_fastgen/llama_cpp_convert && cp -r $T/convert_hf_to_gguf.py $T/conversion $T/gguf-py /tmp/site/llama_fastgen/llama_cpp_convert/
python3 -m llama_fastgen --version
