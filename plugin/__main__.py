"""`llama-fastgen` command line (also `python -m llama_fastgen`)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="llama-fastgen",
        description="Adaptive per-head KV cache compression for llama.cpp (FastGen-style).")
    ap.add_argument("--version", action="store_true",
                    help="print the llama-fastgen version, the pinned llama.cpp commit and the backends")
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__, native

        print(f"llama-fastgen {__version__} (native {native.version()})")
        print(f"llama.cpp {native.llama_commit()} (pinned by llama-cpp-python 0.3.36)")
        print(f"backends: {', '.join(native.backends())}")
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
