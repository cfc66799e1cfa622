"""llama-fastgen: adaptive per-head KV cache compression for llama.cpp.

Importing this package makes llama-cpp-python load the libllama built by llama-fastgen
(the pinned llama.cpp plus our native code), so a plain ``llama_cpp.Llama(model_path=...)``
runs a fastgen GGUF with its compressed cache:

    import llama_fastgen
    from llama_cpp import Llama

The library itself loads when llama_cpp is first imported, not here (see _lib._AfterLlamaCpp).
"""
from . import _lib
from ._lib import LibraryError, exit_if_command, lib_dir, native, prepare

try:
    prepare()
except LibraryError as e:
    exit_if_command(e)  # our commands say it in one line; a program importing the package gets the exception
    raise

__version__ = _lib.installed_version("llama-fastgen")   # pyproject.toml's, as the native library's
__all__ = ["LibraryError", "lib_dir", "llama_cpp", "native", "__version__"]


def __getattr__(name):
    if name == "llama_cpp":     # llama_fastgen.llama_cpp: llama_cpp on our libllama, imported on first use
        from ._lib import load

        return load()
    raise AttributeError(f"module 'llama_fastgen' has no attribute {name!r}")
