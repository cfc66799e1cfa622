#!/usr/bin/env bash
# On the GPU machine (device tool, no registry): build libllama + llama-bench with CUDA for sm_90
# (gpu_build.sh), then run scripts/bench_gpu.py. Usage: scripts/gpu_run.sh [bench_gpu.py args...]; results go to $OUT.
GPU_TARGETS=llama-bench source "$(dirname "$0")/gpu_build.sh"
TREE=$LLAMA_FASTGEN_CACHE/pristine-$PIN
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
