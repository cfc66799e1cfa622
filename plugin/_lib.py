"""Point llama-cpp-python at our libllama and bind the llama_fastgen_* C functions with cffi."""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

from . import headers

_LIB_NAME = "libllama.dylib" if sys.platform == "darwin" else "libllama.so"


class LibraryError(ImportError):
    """The libllama in use is not the one llama-fastgen built."""


def installed_version(dist: str) -> str:
    """A distribution's version as pip installed it (pyproject.toml's, for llama-fastgen); a tree staged
    without pip's metadata (the GPU machine's) says so."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (no package metadata)"


def lib_dir() -> Path:
    """Directory holding our libllama and its ggml libraries."""
    d = Path(__file__).absolute().parent / "lib"  # not resolve(): a development install links the sources
    if not (d / _LIB_NAME).is_file():
        raise LibraryError(
            f"llama-fastgen's native library is missing ({d / _LIB_NAME}); the package was not "
            "built. Install it with scripts/test.sh or `pip install .` from the repository.")
    return d


def _check_loaded(llama_cpp) -> None:
    loaded, ours = Path(llama_cpp.llama_cpp._lib._name).resolve(), lib_dir()
    if loaded.parent != ours:
        raise LibraryError(
            f"llama_cpp was imported before llama_fastgen and loaded {loaded}, not llama-fastgen's "
            f"{ours / _LIB_NAME}. Import llama_fastgen first (in a fresh process).")


class _AfterLlamaCpp(importlib.abc.MetaPathFinder):
    """Checks and extends llama_cpp once something imports it. Importing llama_fastgen does not load
    libllama itself: a CUDA libllama loaded before torch makes torch's import abort (seen on the
    H200), and the converter needs torch but not libllama."""

    def find_spec(self, name, path=None, target=None):
        if name != "llama_cpp":
            return None
        # (a plain find_spec("llama_cpp") lands here too: the hook stays until llama_cpp executes)
        sys.meta_path = [f for f in sys.meta_path if f is not self]
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run, finder = spec.loader.exec_module, self

        def exec_module(module):
            if module.__name__ != "llama_cpp":
                return run(module)
            sys.meta_path = [f for f in sys.meta_path if f is not finder]
            run(module)
            _check_loaded(module)
            _extend(module)

        spec.loader.exec_module = exec_module
        return spec


def exit_if_command(err: Exception) -> None:
    """In one of our commands (llama-fastgen, llama-fastgen-convert, python -m llama_fastgen...), whose first
    import is this package: print the reason as one line and exit 1, not a traceback."""
    commands = {"llama-fastgen", "llama-fastgen-convert"}
    # python -m llama_fastgen[.x]: runpy imports the package from _run_module_as_main(mod_name, ...)
    frame, by_module = sys._getframe(), False
    while frame is not None and not by_module:
        by_module = (frame.f_code.co_name == "_run_module_as_main" and
                     str(frame.f_locals.get("mod_name", "")).split(".")[0] == "llama_fastgen")
        frame = frame.f_back
    if by_module or (sys.argv and Path(sys.argv[0]).name in commands):
        print(f"llama-fastgen: error: {err}", file=sys.stderr)
        raise SystemExit(1)


def prepare() -> None:
    """Point llama-cpp-python at our libllama (it loads the library when first imported)."""
    ours = lib_dir()
    if "llama_cpp" in sys.modules:
        _check_loaded(sys.modules["llama_cpp"])
        _extend(sys.modules["llama_cpp"])
        return
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env and Path(env).resolve() != ours:
        raise LibraryError(
            f"LLAMA_CPP_LIB_PATH={env} points at another libllama; llama-fastgen needs its own "
            f"({ours}). Unset LLAMA_CPP_LIB_PATH before importing llama_fastgen.")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(ours)
    if not any(isinstance(f, _AfterLlamaCpp) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLlamaCpp())


def load():
    """The llama_cpp module, running on our libllama (imported now if nothing has yet)."""
    import llama_cpp

    return llama_cpp


def _extend(llama_cpp) -> None:
    """What llama_fastgen adds to llama_cpp: reasons for refusals, prompt reuse via checkpoints."""
    from . import checkpoints, rpc

    native.lib.llama_fastgen_keep_llama_errors()  # after llama-cpp-python's log callback: in front of it
    _explain_load_errors(llama_cpp)
    _raise_refusals(llama_cpp)
    rpc.install(llama_cpp)
    checkpoints.install(llama_cpp)


def _explain_load_errors(llama_cpp) -> None:
    """llama-cpp-python only says "Failed to load model" / "Failed to create llama_context" /
    "Failed to set llama state data" / "llama_decode returned 1"; add why a fastgen policy, cache, saved
    state or batch was refused."""
    for cls, name, reset in ((llama_cpp._internals.LlamaModel, "__init__", False),
                             (llama_cpp._internals.LlamaContext, "__init__", False),
                             (llama_cpp._internals.LlamaContext, "decode", False),
                             (llama_cpp.llama.Llama, "load_state", True)):
        if not getattr(getattr(cls, name), "_fastgen", False):
            setattr(cls, name, _explained(getattr(cls, name), reset))


def _raise_refusals(llama_cpp) -> None:
    """Shifting positions and copying part of a sequence return nothing in llama.cpp's API; a compressed
    cache that refuses them (llama_kv_cache_fastgen::seq_add, llama_fastgen_hh_memory::seq_cp) sets the
    last error, which becomes a ValueError here instead of a log line that verbose=False hides."""
    ctx = llama_cpp._internals.LlamaContext
    for name in ("kv_cache_seq_shift", "kv_cache_seq_cp"):
        orig = getattr(ctx, name)
        if getattr(orig, "_fastgen", False):
            continue

        def call(*args, _orig=orig, **kwargs):
            native.lib.llama_fastgen_clear_error()
            res = _orig(*args, **kwargs)
            why = native.last_error()
            if why:
                raise ValueError(why)
            return res

        call._fastgen = True
        setattr(ctx, name, call)


def _explained(orig, reset: bool):
    """reset: on failure also reset the Llama (a refused state left its cache empty, so is the
    token history then)."""
    def call(*args, **kwargs):
        native.lib.llama_fastgen_clear_error()
        try:
            return orig(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            if reset:
                args[0].reset()
            why = native.last_error() or native.llama_error()  # ours, else llama.cpp's
            if why:
                raise type(e)(f"{e}: {why}") from None
            raise

    call._fastgen = True
    return call


@lru_cache(maxsize=None)
def _ffi_lib():
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(headers.c_api())   # the C API's declarations, read from its header
    # dlopen of the path ctypes already opened returns the same handle: same library, same state.
    lib = ffi.dlopen(load().llama_cpp._lib._name)
    return ffi, lib


class _Native:
    """Thin Python face of the llama_fastgen_* C API."""

    @property
    def ffi(self):
        return _ffi_lib()[0]

    @property
    def lib(self):
        return _ffi_lib()[1]

    def _str(self, ptr) -> str:
        return self.ffi.string(ptr).decode()

    def version(self) -> str:
        return self._str(self.lib.llama_fastgen_version())

    def llama_commit(self) -> str:
        return self._str(self.lib.llama_fastgen_llama_commit())

    def last_error(self) -> str:
        return self._str(self.lib.llama_fastgen_last_error())

    def llama_error(self) -> str:
        """llama.cpp's own first error line since the last clear (verbose=False hides it), as one line."""
        return " ".join(self._str(self.lib.llama_fastgen_llama_error()).split())

    def mask_counts(self, ctx) -> dict:
        """Decode steps' full-class masks of a llama_context (a pointer): filled over every cell, updated from the
        last step's, and updates that differed from the fill (LLAMA_FASTGEN_CHECK_MASK=1)."""
        counts = [self.ffi.new("uint64_t *") for _ in range(3)]
        self.lib.llama_fastgen_ctx_mask_counts(self.ffi.cast("void *", ctx), *counts)
        return dict(zip(("filled", "updated", "mismatched"), (int(c[0]) for c in counts)))

    def cache_stats(self, llm) -> dict:
        """What the cache of a llama_cpp.Llama holds: per class bytes/cells/used, totals."""
        ctx = self.ffi.cast("void *", llm._ctx.ctx)
        lib = self.lib
        classes = []
        for c in range(lib.llama_fastgen_ctx_n_class(ctx)):
            if lib.llama_fastgen_ctx_class_cells(ctx, c) == 0:
                continue  # class without heads in any layer
            classes.append({"class": self._str(lib.llama_fastgen_ctx_class_name(ctx, c)),  # as sized for n_ctx
                            "bytes": int(lib.llama_fastgen_ctx_class_bytes(ctx, c)),
                            "cells": int(lib.llama_fastgen_ctx_class_cells(ctx, c)),
                            "used": int(lib.llama_fastgen_ctx_class_used(ctx, c)),
                            "dropped_upto": int(lib.llama_fastgen_ctx_class_dropped_upto(ctx, c, 0))})
        by_buffer = {self._str(lib.llama_fastgen_ctx_kv_buft_name(ctx, i)): int(lib.llama_fastgen_ctx_kv_buft_bytes(ctx, i))
                     for i in range(lib.llama_fastgen_ctx_kv_n_buft(ctx))}
        return {"fastgen": bool(classes), "classes": classes,
                "masks": self.mask_counts(ctx),
                "kv_bytes": int(lib.llama_fastgen_ctx_kv_bytes(ctx)),
                "full_bytes": int(lib.llama_fastgen_ctx_full_bytes(ctx)),
                "kv_bytes_by_buffer": by_buffer}  # where the bytes live (device buffers when split)

    def backends(self) -> list[str]:
        load().llama_backend_init()  # registers the backends compiled into ggml
        s = self._str(self.lib.llama_fastgen_backends())
        return [b for b in s.split(",") if b]


native = _Native()

