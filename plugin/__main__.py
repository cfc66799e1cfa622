"""`llama-fastgen` command line (also `python -m llama_fastgen`)."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="llama-fastgen",
        description="Adaptive per-head KV cache compression for llama.cpp (FastGen-style).")
    ap.add_argument("--version", action="store_true",
                    help="print the llama-fastgen version, the pinned llama.cpp commit and the backends")
    sub = ap.add_subparsers(dest="cmd")
    ins = sub.add_parser("inspect", help="policy table of a fastgen GGUF and its KV footprint")
    ins.add_argument("model", help="GGUF file")
    ins.add_argument("--ctx", type=int, help="context length (default: 4096, 8192, 32768)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ch = sub.add_parser("chat", help="chat with a GGUF through llama_cpp.Llama (streams)")
    ch.add_argument("model", help="GGUF file")
    ch.add_argument("--prompt", action="append", help="scripted user turn (repeatable); default: interactive on a terminal")
    ch.add_argument("--n-ctx", type=int, default=4096)
    ch.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args(argv)

    if args.version:
        from . import __version__, native

        print(f"llama-fastgen {__version__} (native {native.version()})")
        print(f"llama.cpp {native.llama_commit()} (pinned by llama-cpp-python 0.3.36)")
        print(f"backends: {', '.join(native.backends())}")
        return 0
    if args.cmd in ("inspect", "chat") and not os.path.isfile(args.model):
        print(f"llama-fastgen: error: model file {args.model} does not exist", file=sys.stderr)
        return 2
    if args.cmd == "inspect":
        from . import schema
        from .inspect_gguf import table

        try:
            print(table(args.model, args.ctx, args.json))
        except (schema.MetadataError, ValueError) as e:
            print(f"llama-fastgen: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "chat":
        from .chat import run

        return run(args.model, args.prompt, args.n_ctx, args.max_tokens)
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
