"""The contract's sizing rules, run by the same C code libllama runs (native/src/llama-fastgen-contract.c,
declared in llama-fastgen-contract.h): its own small library next to libllama, loaded without libllama,
ggml or CUDA, so the converter (torch) may call it too."""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from . import headers

_NAME = "libfastgen-contract" + (".dylib" if sys.platform == "darwin" else ".dll" if sys.platform == "win32" else ".so")


@lru_cache(maxsize=None)
def _lib():
    import cffi

    path = Path(__file__).absolute().parent / "lib" / _NAME   # not resolve(): a development install links the sources
    if not path.is_file():
        raise ImportError(f"llama-fastgen's contract library is missing ({path}); the package was not built. "
                          "Install it with scripts/test.sh or `pip install .` from the repository.")
    ffi = cffi.FFI()
    ffi.cdef(headers.contract_api())
    return ffi, ffi.dlopen(str(path))


def class_cells(kind: int, window: int, budget: int, n_sink: int, protected_frac: float, n_ctx: int, n_ubatch: int,
                n_seq: int = 1) -> int:
    """Cells a class allocates (llama_fastgen_class_cells): full n_ctx, frequent budget + max(n_ubatch,
    FREQUENT_EVICT_BATCH) per store head, the others their padded slice."""
    return int(_lib()[1].llama_fastgen_class_cells(kind, window, budget, n_sink, protected_frac, n_ctx, n_ubatch, n_seq))


def class_at_context(kind: int, window: int, budget: int, n_sink: int, n_ctx: int, budget_ctx: int) -> tuple[int, int]:
    """(window, budget) the class runs at n_ctx when sized for budget_ctx (llama_fastgen_class_at_context)."""
    ffi, lib = _lib()
    w, b = ffi.new("int32_t *", window), ffi.new("int32_t *", budget)
    lib.llama_fastgen_class_at_context(kind, w, b, n_sink, n_ctx, budget_ctx)
    return int(w[0]), int(b[0])


def class_problem(kind: int, window: int, budget: int, n_sink: int) -> int:
    """0 if the class can load, else what is wrong with it (llama_fastgen_class_problem: CLASS_BAD_KIND, ...)."""
    return int(_lib()[1].llama_fastgen_class_problem(kind, window, budget, n_sink))
