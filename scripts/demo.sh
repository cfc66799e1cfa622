#!/usr/bin/env bash
# The main job end to end on the bundled default: set up (cached), profile and convert
# SmolLM2-135M-Instruct with `convert.py --profile`, show what the cache keeps, then chat with it
# through llama_cpp.Llama(model_path=...): interactive on a terminal, a scripted exchange otherwise.
#   scripts/demo.sh [--force]     (--force re-profiles even if the GGUF exists)
set -euo pipefail
source "$(dirname "$0")/setup.sh"
OUT="$ROOT/.cache/demo/SmolLM2-135M-Instruct-fastgen.gguf"
mkdir -p "$(dirname "$OUT")"
if [ ! -f "$OUT" ] || [ "${1:-}" = "--force" ]; then
    step "profiling attention, finding retrieval heads and converting (about 12 min on 2 cores)"
    python converter/convert.py --profile "$MODEL_DIR" --outfile "$OUT"
fi
step "what the fastgen GGUF asks each KV head to keep"
llama-fastgen inspect "$OUT" --ctx 8192 | tail -n 1
echo "   policy heat map: ${OUT%.gguf}.fastgen.png, report: ${OUT%.gguf}.fastgen.json"
step "chatting through llama_cpp.Llama(model_path=...)"
llama-fastgen chat "$OUT"
