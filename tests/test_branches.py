"""The region finder behind CUDA's two streams (native/ggml/ggml-fastgen-branches.h), on the CPU: which nodes of a
mixed layer may run beside the heavy-hitter op. A wrong split is a data race on the GPU, so the finder is checked
here against graphs built as llama-graph-fastgen.cpp builds them (tests/native/branch_regions.cpp)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llama_fastgen

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def regions(tmp_path_factory) -> list[dict]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.fail("no C++ compiler: the build needs one too (CXX or c++)")
    tree = Path(subprocess.run([sys.executable, str(REPO / "native" / "llama_cpp_tree.py"), "prepare"],
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    lib = llama_fastgen.lib_dir()
    exe = tmp_path_factory.mktemp("branches") / "branch_regions"
    subprocess.run([cxx, "-std=c++17", "-O0", str(REPO / "tests" / "native" / "branch_regions.cpp"),
                    f"-I{tree / 'ggml' / 'include'}", f"-I{tree / 'ggml' / 'src'}", f"-I{REPO / 'native' / 'ggml'}",
                    f"-I{REPO / 'native' / 'include'}", f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)],
                   check=True, capture_output=True)
    return json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)


def test_a_mixed_layer_splits_into_the_full_class_and_the_heavy_hitter_op(regions):
    # layer 0 only: layer 1 has no full class, layer 2's full class reads the op, layer 3 shares a view after the fork
    assert [(r["op"], r["fork"], r["join"]) for r in regions] == [("kqv_hh-0", "Kcur-0", "kqv_out-0")]
    nodes = regions[0]["nodes"]
    two = [(name, noop) for name, branch, noop in nodes if branch == 2]
    one = [(name, noop) for name, branch, noop in nodes if branch == 1]
    # branch 2: the op and the views it reads q, K and V through (made after the fork; "Vcur", made before it, is nobody's)
    assert sorted(two) == [("Kcur-0 (view)", 1), ("Qcur-0 (view)", 1), ("Vcur-0 (view)", 1), ("kqv_hh-0", 0)]
    # branch 1: the full class's K and V rows and its attention, each launching work, never the op
    launched = {name for name, noop in one if not noop}
    assert {"k_rows-0", "v_rows-0", "kq_full-0"} <= launched
    assert not any(name.startswith("kqv_hh") for name, _ in one)
