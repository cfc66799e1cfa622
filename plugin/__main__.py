"""`llama-fastgen` command line (also `python -m llama_fastgen`)."""
from __future__ import annotations

import argparse
import os
import sys


def _ranged(lo: int, hi: int, what: str):
    """argparse type: an int in [lo, hi], or a usage error that says which range."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a whole number of {what}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"expected {lo} to {hi} {what}, got {n}")
        return n
    return parse


def main(argv: list[str] | None = None) -> int:
    from .schema import MAX_CELLS

    ctx = _ranged(1, MAX_CELLS, "tokens of context")
    ap = argparse.ArgumentParser(
        prog="llama-fastgen",
        description="Adaptive per-head KV cache compression for llama.cpp (FastGen-style).")
    ap.add_argument("--version", action="store_true",
                    help="print the llama-fastgen version, the pinned llama.cpp commit and the backends")
    sub = ap.add_subparsers(dest="cmd")
    ins = sub.add_parser("inspect", help="policy table of a fastgen GGUF and its KV footprint")
    ins.add_argument("model", help="GGUF file")
    ins.add_argument("--ctx", type=ctx, help="context length (default: 4096, 8192, 32768)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ch = sub.add_parser("chat", help="chat with a GGUF through llama_cpp.Llama (streams)")
    ch.add_argument("model", help="GGUF file")
    ch.add_argument("--prompt", action="append", help="scripted user turn (repeatable; '-' reads one turn per line of standard input); default: "
                    "interactive on a terminal, else two scripted demo turns")
    ch.add_argument("--n-ctx", type=ctx, default=4096)
    ch.add_argument("--max-tokens", type=_ranged(1, MAX_CELLS, "tokens"), default=200)
    sv = sub.add_parser("serve", help="llama-cpp-python's OpenAI-compatible server (python -m llama_cpp.server) "
                        "on our libllama", description="Serve a GGUF with llama_cpp.server; every option after "
                        "the model is passed on (e.g. --port 8000 --n_ctx 8192; see python -m llama_cpp.server --help).")
    sv.add_argument("model", help="GGUF file")
    sv.add_argument("server_args", nargs=argparse.REMAINDER, help="llama_cpp.server options")
    rp = sub.add_parser("rpc-server", help="serve this machine's CPU to llama.cpp RPC clients (layers split "
                        "over machines or processes; see llama_fastgen.rpc)")
    rp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the protocol "
                    "has no authentication)")
    rp.add_argument("--port", type=_ranged(1, 65535, "(a TCP port)"), default=50052)
    rp.add_argument("--threads", type=_ranged(0, 4096, "threads"), default=0, help="CPU threads (default: all cores)")
    args = ap.parse_args(argv)

    if args.version:
        from . import __version__, native
        from ._lib import installed_version

        print(f"llama-fastgen {__version__} (native {native.version()})")
        print(f"llama.cpp {native.llama_commit()} (pinned by llama-cpp-python {installed_version('llama_cpp_python')})")
        print(f"backends: {', '.join(native.backends())}")
        return 0
    if args.cmd in ("inspect", "chat", "serve") and not os.path.isfile(args.model):
        why = "is a directory, not a GGUF file" if os.path.isdir(args.model) else "does not exist"
        print(f"llama-fastgen: error: model file {args.model} {why}", file=sys.stderr)
        return 2
    if args.cmd in ("chat", "serve"):   # (inspect reads it first anyway)
        from . import checkpoints, schema

        try:  # a cut, foreign or malformed file, a bad switch: the reason, before llama.cpp loads it
            schema.read(args.model)
            checkpoints.max_checkpoints()   # (else read at the first prompt: every request of a server fails)
        except ValueError as e:
            print(f"llama-fastgen: error: {e}", file=sys.stderr)
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

        try:
            return run(args.model, args.prompt, args.n_ctx, args.max_tokens)
        except ValueError as e:  # a GGUF or policy llama.cpp refused: say why, as inspect and serve do
            print(f"llama-fastgen: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "serve":
        return serve(args.model, args.server_args)
    if args.cmd == "rpc-server":
        from .rpc import RpcError, serve as rpc_serve

        try:
            rpc_serve(args.host, args.port, args.threads)
        except RpcError as e:
            print(f"llama-fastgen: error: {e}", file=sys.stderr)
            return 2
    ap.print_help()
    return 0


def serve(model: str, server_args: list[str]) -> int:
    """llama_cpp.server's own main, after llama_fastgen has pointed llama_cpp at our libllama (the
    plain `python -m llama_cpp.server` would load whatever LLAMA_CPP_LIB_PATH names)."""
    # importing this package has pointed llama_cpp at our libllama (LLAMA_CPP_LIB_PATH)
    try:
        from llama_cpp.server.__main__ import main as server_main
    except ImportError as e:
        print(f"llama-fastgen: error: the server needs llama-cpp-python's server packages ({e.name} is missing); "
              f"pip install 'llama-fastgen[serve]'", file=sys.stderr)
        return 2
    sys.argv = ["llama-fastgen serve", "--model", model, *server_args]
    try:
        server_main()
    except ValueError as e:  # a fastgen policy or context the native code refused: say why, no traceback
        print(f"llama-fastgen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
