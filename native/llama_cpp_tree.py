#!/usr/bin/env python3
"""Obtain the llama.cpp tree pinned by llama-cpp-python, apply native/patches, cache it.

Stdlib only: CMake runs this at configure time, before any of our dependencies exist.

    python native/llama_cpp_tree.py fetch     # download + verify the sdist, print its path
    python native/llama_cpp_tree.py prepare   # ... and print the patched tree's directory

Layout under the cache (default: <repo>/.cache/llama.cpp, override with LLAMA_FASTGEN_CACHE):
    llama_cpp_python-0.3.36.tar.gz   the verified sdist (also what llama-cpp-python installs from)
    pristine-<commit>/               vendor/llama.cpp as shipped, never modified
    patched-<commit>/                pristine + native/patches/*.patch, what CMake builds
When the patch set changes only the files the old and new patches touch are restored and
re-patched, so ninja rebuilds incrementally instead of from scratch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"  # ggml-org/llama.cpp commit vendored by that sdist (its CHANGELOG)

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "native" / "patches"
# Parts of vendor/llama.cpp we never need (docs, media, benchmarks, most test vocabularies).
SKIP_TOP = {"docs", "media", "benches", "app", "pocs", "examples", "ci", "skills"}
KEEP_MODELS = {"ggml-vocab-llama-bpe.gguf"}


class TreeError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_FASTGEN_CACHE", REPO / ".cache" / "llama.cpp"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(sdist: Path | None = None) -> Path:
    """Return the verified sdist, downloading it with pip when it is not cached."""
    target = cache_dir() / SDIST_NAME
    if sdist is not None:
        if not sdist.is_file():
            raise TreeError(f"--sdist {sdist} does not exist")
        if sha256(sdist) != SDIST_SHA256:
            raise TreeError(f"{sdist} has the wrong sha256; expected {SDIST_SHA256} "
                            f"(the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist)")
        if sdist.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sdist, target)
        return target
    if target.is_file() and sha256(target) == SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # --no-binary for this one package only: ':all:' would also build cmake from source
        # for the metadata step (measured: > 10 minutes).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               "--no-build-isolation", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if r.returncode != 0 or not got.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise TreeError("could not download the llama-cpp-python "
                            f"{LLAMA_CPP_PYTHON_VERSION} sdist with pip (is PyPI reachable? "
                            f"scikit-build-core installed?): {' | '.join(tail)}")
        digest = sha256(got)
        if digest != SDIST_SHA256:
            raise TreeError(f"downloaded {SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}: "
                            "the registry served a different file; refusing to build from it")
        os.replace(got, target)
    return target


def _wanted(rel: str) -> bool:
    parts = rel.split("/")
    if not parts or parts[0] in SKIP_TOP:
        return False
    if parts[0] == "models" and len(parts) > 1 and parts[1] not in KEEP_MODELS:
        return False
    return True


def _extract_pristine(sdist: Path, dest: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(prefix):]
                if rel and _wanted(rel):
                    m.name = rel
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, dest)  # appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def _touched(patch: Path) -> list[str]:
    files = []
    for line in patch.read_text().splitlines():
        if line.startswith("+++ ") and not line.startswith("+++ /dev/null"):
            files.append(line[4:].split("\t")[0].removeprefix("b/"))
        elif line.startswith("--- ") and not line.startswith("--- /dev/null"):
            files.append(line[4:].split("\t")[0].removeprefix("a/"))
    return sorted(set(files))


def _apply(patch: Path, tree: Path) -> None:
    r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-r", "-",
                        "-i", str(patch)], cwd=tree, capture_output=True, text=True)
    if r.returncode != 0:
        raise TreeError(f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}: "
                        f"{(r.stdout + r.stderr).strip().splitlines()[-1:]} -- rebase it against "
                        f"{tree} (pristine copy next to it)")


def prepare(sdist: Path | None = None) -> Path:
    """Return the patched tree, creating or updating it incrementally."""
    if shutil.which("patch") is None:
        raise TreeError("the 'patch' program is missing; install it (Debian: apt-get install patch)")
    root = cache_dir()
    pristine = root / f"pristine-{LLAMA_CPP_COMMIT}"
    patched = root / f"patched-{LLAMA_CPP_COMMIT}"
    stamp = patched / ".fastgen-patches.json"
    if not pristine.is_dir():  # (a carried pristine tree needs no sdist: the GPU machine has no registry)
        _extract_pristine(fetch(sdist), pristine)
    want = {p.name: sha256(p) for p in _patches()}
    if not patched.is_dir() or not stamp.is_file():
        shutil.rmtree(patched, ignore_errors=True)
        tmp = root / f".patched-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pristine, tmp, symlinks=True)
        for p in _patches():
            _apply(p, tmp)
        (tmp / stamp.name).write_text(json.dumps({"patches": want, "touched": _all_touched()}))
        os.replace(tmp, patched)
        return patched
    have = json.loads(stamp.read_text())
    if have["patches"] == want:
        return patched
    # Restore every file an old or new patch touches (fresh mtime so ninja notices), re-apply.
    stamp.unlink()
    for rel in sorted(set(have["touched"]) | set(_all_touched())):
        src, dst = pristine / rel, patched / rel
        if src.is_file():
            shutil.copyfile(src, dst)
        elif dst.exists():
            dst.unlink()  # created by an old patch
    for p in _patches():
        _apply(p, patched)
    stamp.write_text(json.dumps({"patches": want, "touched": _all_touched()}))
    return patched


def _all_touched() -> list[str]:
    return sorted({f for p in _patches() for f in _touched(p)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["fetch", "prepare", "commit"])
    ap.add_argument("--sdist", type=Path, help="use this llama-cpp-python sdist instead of downloading")
    a = ap.parse_args()
    try:
        if a.action == "commit":
            print(LLAMA_CPP_COMMIT)
        elif a.action == "fetch":
            print(fetch(a.sdist))
        else:
            print(prepare(a.sdist))
    except TreeError as e:
        print(f"llama-fastgen: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
