"""GGUF writing through the pinned llama.cpp converter (installed with the package).

The pinned convert_hf_to_gguf.py runs in a subprocess: it puts its own gguf-py first on
sys.path, which must not clash with a gguf already imported here. Extra fastgen.* keys are added
to its writer just before the header is written. The result appears under the final name only
when complete and when its fastgen keys pass the checks a load makes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_RUNNER = r"""
import json, sys
tree, kv_json = sys.argv[1], sys.argv[2]
sys.argv = [tree + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, tree)
import convert_hf_to_gguf as C
from llama_fastgen.schema import add_to_writer
gguf = C.gguf
extra = json.loads(open(kv_json).read()) if kv_json != "-" else {}
orig = gguf.GGUFWriter.write_header_to_file
def write_header_to_file(self, *a, **k):
    add_to_writer(self, extra, gguf)
    return orig(self, *a, **k)
gguf.GGUFWriter.write_header_to_file = write_header_to_file
C.main()
"""


class ExportError(RuntimeError):
    pass


def pinned_tree() -> Path:
    spec = importlib.util.find_spec("llama_fastgen")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("llama_fastgen is not installed; run scripts/test.sh or `pip install .`")
    tree = Path(list(spec.submodule_search_locations)[0]) / "llama_cpp_convert"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"the pinned converter is missing from {tree}; reinstall llama-fastgen")
    return tree


def convert(model_dir: Path, outfile: Path, outtype: str = "f16",
            extra_kv: dict | None = None, verbose: bool = False, check: bool = True) -> Path:
    """Run the pinned converter on an HF directory; add `extra_kv` ({key: (type, value)}); check=False
    writes fastgen keys a load refuses (the loaders' tests)."""
    outfile = Path(outfile)
    outdir = outfile.resolve().parent
    if not outdir.is_dir() or not os.access(outdir, os.W_OK):
        raise ExportError(f"cannot write {outfile}: {outdir} is not a writable directory")
    fd, tmp = tempfile.mkstemp(dir=outdir, prefix=f".{outfile.name}.", suffix=".partial")
    os.close(fd)
    kv_file = None
    try:
        if extra_kv:
            kv_file = tmp + ".kv.json"
            Path(kv_file).write_text(json.dumps(extra_kv))
        cmd = [sys.executable, "-c", _RUNNER, str(pinned_tree()), kv_file or "-", str(model_dir),
               "--outfile", tmp, "--outtype", outtype]
        r = subprocess.run(cmd, capture_output=not verbose, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or "").strip().splitlines()[-8:]) if not verbose else ""
            raise ExportError(f"the pinned convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
        if extra_kv and check:  # read back as a load would: a file that cannot load never takes the final name
            from llama_fastgen.schema import MetadataError, read

            try:
                read(tmp)
            except MetadataError as e:
                why = str(e).replace(f"{tmp}: ", "").removesuffix("; re-run convert.py --profile")
                raise ExportError(f"the fastgen metadata for {outfile} fails the loader's checks ({why}); "
                                  f"nothing was written") from None
        os.replace(tmp, outfile)
    finally:
        for f in (tmp, kv_file):
            if f and os.path.exists(f):
                os.unlink(f)
    return outfile


def convert_stock(model_dir: Path, outfile: Path, outtype: str = "f16") -> Path:
    """Exactly the pinned convert_hf_to_gguf.py, no fastgen metadata."""
    return convert(model_dir, outfile, outtype)
