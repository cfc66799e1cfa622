#!/usr/bin/env bash
# On the GPU machine (device tool, no registry): build libllama + llama-bench with CUDA for sm_90
# from the carried pinned tree (scripts/pack_gpu.sh), stage the Python package, then run
# scripts/bench_gpu.py. Usage: scripts/gpu_run.sh [bench_gpu.py args...]; results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export LLAMA_FASTGEN_CACHE=/tmp/fgcache
[ -d $LLAMA_FASTGEN_CACHE/pristine-0c1e57098 ] || { mkdir -p $LLAMA_FASTGEN_CACHE && tar -C $LLAMA_FASTGEN_CACHE -xJf .gpu/tree.tar.xz; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site
t0=$(date +%s)
# a warm machine keeps /tmp: reuse its build and models (ninja rebuilds only what changed)
cmake -S . -B /tmp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON > "$OUT/build.log" 2>&1
cmake --build /tmp/build -j 16 --target llama llama-bench >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "CUDA build: $(( $(date +%s) - t0 )) s"
# stage llama_fastgen like an installed wheel: package + its lib/ folder
mkdir -p /tmp/site/llama_fastgen/lib /tmp/site/llama_fastgen/converter
cp -r plugin/* /tmp/site/llama_fastgen/ && cp -r converter/* /tmp/site/llama_fastgen/converter/
find /tmp/build -name 'lib*.so*' -exec cp -P {} /tmp/site/llama_fastgen/lib/ \;
python3 -m llama_fastgen --version
TREE=$LLAMA_FASTGEN_CACHE/pristine-0c1e57098
t0=$(date +%s)
for shape in small small-d128 llama3-8b; do
    [ -f /tmp/$shape.gguf ] || python3 scripts/make_random_gguf.py --shape $shape --profile .gpu/profile.json \
        --tree $TREE --out /tmp/$shape.gguf
done
[ -f /tmp/llama3-8b-nohh.gguf ] || python3 scripts/make_random_gguf.py --shape llama3-8b --profile .gpu/profile.json \
    --tree $TREE --out /tmp/llama3-8b-nohh.gguf --frequent-as-full
echo "random GGUFs: $(( $(date +%s) - t0 )) s"
PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py "$@" --small /tmp/small.gguf /tmp/small-d128.gguf --model /tmp/llama3-8b.gguf \
    --model-nohh /tmp/llama3-8b-nohh.gguf \
    --llama-bench "$(find /tmp/build -name llama-bench -type f | head -1)" --json "$OUT/bench_gpu.json" 2> "$OUT/bench.log" || { tail -20 "$OUT/bench.log"; exit 1; }
