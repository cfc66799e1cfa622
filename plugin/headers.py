"""The native headers Python reads instead of copying what they say: the contract's numbers
(llama-fastgen-contract.h) and the C API's declarations (llama-fastgen.h, bound with cffi).
Installed next to this file; in the source tree they live in native/include."""
from __future__ import annotations

import re
from pathlib import Path


def find(name: str) -> Path:
    here, tree = Path(__file__).absolute().parent, Path(__file__).resolve().parent.parent   # installed; source tree
    for p in (here / name, tree / "native" / "include" / name):
        if p.is_file():
            return p
    raise ImportError(f"{name} is missing next to {__file__}; reinstall llama-fastgen")


def contract() -> dict[str, int | str]:
    """#define LLAMA_FASTGEN_<NAME> <integer or "string"> lines of the contract header, as {NAME: value}."""
    text = find("llama-fastgen-contract.h").read_text()
    return {m[1]: int(m[2]) if m[2] else m[3]
            for m in re.finditer(r'^#define LLAMA_FASTGEN_(\w+) (?:(\d+)|"([^"]*)")$', text, re.M)}


def contract_api() -> str:
    """The LLAMA_FASTGEN_CONTRACT_API declarations of the contract header as a cffi cdef."""
    text = re.sub(r"//[^\n]*", "", find("llama-fastgen-contract.h").read_text())
    return "\n".join(" ".join(d.split()) for d in re.findall(r"^LLAMA_FASTGEN_CONTRACT_API\s+(.*?;)", text, re.M | re.S))


def c_api() -> str:
    """The LLAMA_API declarations of llama-fastgen.h as a cffi cdef (llama types opaque)."""
    text = re.sub(r"//[^\n]*", "", find("llama-fastgen.h").read_text())
    decls = re.findall(r"^LLAMA_API\s+(.*?;)", text, re.M | re.S)
    return "struct llama_model;\nstruct llama_context;\n" + "\n".join(" ".join(d.split()) for d in decls)
