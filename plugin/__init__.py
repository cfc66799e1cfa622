"""llama-fastgen: adaptive per-head KV cache compression for llama.cpp.

Importing this package makes llama-cpp-python load the libllama built by llama-fastgen
(the pinned llama.cpp plus our native code), so a plain ``llama_cpp.Llama(model_path=...)``
runs a fastgen GGUF with its compressed cache:

    import llama_fastgen
    from llama_cpp import Llama
"""
from ._lib import LibraryError, lib_dir, llama_cpp, native

__version__ = "0.1.0"
__all__ = ["LibraryError", "lib_dir", "llama_cpp", "native", "__version__"]
