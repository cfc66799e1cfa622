#!/usr/bin/env bash
# Pack what the GPU machine (no registry there) needs into .gpu/ (ignored, carried by the device
# tool): the pristine pinned llama.cpp tree without server/ui (~5 MB as tar.xz) and wheels of
# llama-cpp-python (no native build), diskcache, cffi and pycparser for its Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
TREE="$(python native/llama_cpp_tree.py prepare)"
PRISTINE="$(dirname "$TREE")/pristine-$(python native/llama_cpp_tree.py commit)"
mkdir -p .gpu && rm -f .gpu/*
tar -C "$(dirname "$PRISTINE")" -cJf .gpu/tree.tar.xz --exclude='tools/server' --exclude='tools/ui' "$(basename "$PRISTINE")"
SDIST="$(python native/llama_cpp_tree.py fetch)"
CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip wheel -q --no-deps --no-build-isolation -w .gpu "$SDIST"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu diskcache==5.6.3 cffi==2.0.0 pycparser
ls -la .gpu
