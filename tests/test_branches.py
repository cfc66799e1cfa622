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


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:2])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def finder(tmp_path_factory):
    """finder(tokens, beside) -> (the regions found, the finder's debug lines, the marked rows and their pairs)"""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.fail("no C++ compiler: the build needs one too (CXX or c++)")
    prep = _run([sys.executable, str(REPO / "native" / "llama_cpp_tree.py"), "prepare"])
    tree = Path(prep.stdout.strip().splitlines()[-1])
    lib = llama_fastgen.lib_dir()
    exe = tmp_path_factory.mktemp("branches") / "branch_regions"
    _run([cxx, "-std=c++17", "-O0", str(REPO / "tests" / "native" / "branch_regions.cpp"),
          f"-I{tree / 'ggml' / 'include'}", f"-I{tree / 'ggml' / 'src'}", f"-I{REPO / 'native' / 'ggml'}",
          f"-I{REPO / 'native' / 'include'}", f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)])

    def run(tokens: int, beside: int) -> tuple[list[dict], list[str], list[list[str]]]:
        r = _run([str(exe), str(tokens), str(beside)], env={**os.environ, "DEBUG": "1"})
        out = json.loads(r.stdout)
        return out["regions"], [ln for ln in r.stderr.splitlines() if "ggml_fastgen_branch_regions" in ln], out["rows_pairs"]
    return run


@pytest.fixture(scope="module")
def regions(finder) -> list[dict]:
    return finder(1, 1)[0]


def test_a_mixed_layer_splits_into_the_full_class_and_the_heavy_hitter_op(regions):
    # layers 0 and 4-6: layer 1 has no full class, layer 2's first reader of the op is no concat, and in layer 3 the
    # full class reads a view that the op reads too, made after the fork
    assert [(r["op"], r["fork"], r["join"]) for r in regions] == [("kqv_hh-0", "Kcur-0", "kqv_out-0")] + [
        (f"kqv_hh-{il}", f"Kcur-{il}", f"kqv_out-{il}") for il in (4, 5, 6)]
    nodes = regions[0]["nodes"]
    two = [(name, noop) for name, branch, noop in nodes if branch == 2]
    one = [(name, noop) for name, branch, noop in nodes if branch == 1]
    # branch 2: the op and the views it reads q, K and V through (made after the fork; "Vcur", made before it, is nobody's)
    assert sorted(two) == [("k_hh-0", 1), ("kqv_hh-0", 0), ("q_hh-0", 1), ("v_hh-0", 1)]
    # branch 1: the full class's K and V rows and its attention, each launching work, never the op or its views
    launched = {name for name, noop in one if not noop}
    assert {"k_rows-0", "v_rows-0", "kq_full-0"} <= launched
    assert not any(name.endswith("_hh-0") for name, _ in one)


def test_only_decode_steps_of_graphs_computed_whole_split(finder):
    # G = 2 query heads per KV head: 16 tokens are 32 rows per head (GGML_FASTGEN_HH_MAX_ROWS, the decode kernel's
    # bound), 17 tokens run the prefill kernels, which fill the GPU on their own
    found, _, _ = finder(16, 1)
    assert [(r["op"], r["join"]) for r in found] == [(f"kqv_hh-{il}", f"kqv_out-{il}") for il in (0, 4, 5, 6)]
    for tokens, beside, why in ((17, 1, "prefill rows"), (1, 0, "eval callback")):
        found, debug, _ = finder(tokens, beside)
        assert found == [], (tokens, beside)
        # every layer's op is turned away for that reason, before the graph is searched
        assert len(debug) == 7 and all(f"one stream ({why})" in ln for ln in debug), debug


def test_a_one_token_join_of_a_flash_attention_and_the_op_is_written_in_place(finder, regions):
    # layers 4 and 5 (a marked flash attention, either order in the concat): CUDA points both parts into the concat's
    # buffer and launches no concat (ggml-fastgen-fuse.cu); layer 0's full class is no flash attention; in layer 6
    # another node reads the attention's output; with 16 tokens the parts' rows interleave
    assert [(r["op"], r["in_place"]) for r in regions] == [("kqv_hh-0", 0), ("kqv_hh-4", 1), ("kqv_hh-5", 1), ("kqv_hh-6", 0)]
    for r in regions[1:]: # the flash attention is computed in the region's first branch, after the fork
        il = r["op"][-1]
        assert [(name, branch) for name, branch, _ in r["nodes"] if name == f"fa-{il}"] == [(f"fa-{il}", 1)]
    found, _, _ = finder(16, 1)
    assert [r["in_place"] for r in found] == [0, 0, 0, 0]


def test_a_class_s_k_rows_pair_with_its_v_rows_across_views_only(finder):
    # the marked K rows of layers 4-6 pair with their V rows (views between), the V rows with nothing after them (the
    # next node that launches is the flash attention); layer 0's rows are not marked
    _, _, pairs = finder(1, 1)
    assert pairs == [p for il in (4, 5, 6) for p in ([f"k_rows-{il}", f"v_rows-{il}"], [f"v_rows-{il}", ""])]
