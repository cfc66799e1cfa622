"""Layers split over llama.cpp RPC servers: llama.cpp's own RPC backend (ggml-rpc), as its `rpc-server`
and `--rpc` drive it, reached from Python (llama-cpp-python 0.3.36's ``Llama`` has no ``rpc_servers``).

    llama-fastgen rpc-server --port 50052            # on each machine (or twice on one, other ports)

    from llama_fastgen import rpc
    rpc.add_servers(["127.0.0.1:50052", "127.0.0.1:50053"])
    llm = Llama(model_path="model.fastgen.gguf", n_gpu_layers=-1)    # layers and their caches split

A fastgen cache splits with its layers: each class slice and heavy-hitter store lives where its layer
runs. ``add_servers`` asks each server in a child process first (llama.cpp's RPC client aborts the
process when nothing answers), and every model load asks the registered servers again, so one that
stopped since is an ``RpcError`` instead of an abort; a server that dies mid-run still aborts its
client. Servers are unauthenticated: keep them on 127.0.0.1 or a private network.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

from ._lib import load, native


class RpcError(RuntimeError):
    """No RPC backend in this build, or a server that does not answer."""


_registered: list[str] = []   # endpoints whose devices this process has registered


def check_servers() -> None:
    """Ask every registered server again (before a model load: llama.cpp aborts when one is gone)."""
    for e in _registered:
        _probe(e)


def install(llama_cpp) -> None:
    """Every model load (llama-cpp-python's LlamaModel calls llama_model_load_from_file) asks the
    registered servers first; a server that stopped is an RpcError, not an abort in the load."""
    low = llama_cpp.llama_cpp
    orig = low.llama_model_load_from_file
    if getattr(orig, "_fastgen", False):
        return

    def llama_model_load_from_file(*args):
        check_servers()
        return orig(*args)

    llama_model_load_from_file._fastgen = True
    low.llama_model_load_from_file = llama_model_load_from_file


def add_servers(endpoints: list[str]) -> None:
    """Register the devices of each "host:port" server; models loaded afterwards with n_gpu_layers split
    their layers over every registered device (llama.cpp's layer split)."""
    for e in endpoints:
        _probe(e)
    load().llama_backend_init()
    for e in endpoints:
        if not native.lib.llama_fastgen_rpc_add_server(e.encode()):
            raise RpcError(native.last_error())
        _registered.append(e)


def _probe(endpoint: str) -> None:
    """Ask the server for its devices in a child process first: llama.cpp's RPC client aborts the process
    when nothing (or something else) answers there, and that must not take the caller with it."""
    code = ("import sys, llama_fastgen; llama_fastgen.native.lib.llama_fastgen_rpc_add_server(sys.argv[1].encode()) "
            "or sys.exit(llama_fastgen.native.last_error())")
    r = subprocess.run([sys.executable, "-c", code, endpoint], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    if r.returncode != 0:
        # ggml's abort message ("ggml-rpc.cpp:547: Failed to connect to ...") or our own error
        why = re.findall(r"ggml-rpc\.cpp:\d+: (.+)", r.stderr) or r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise RpcError(f"no RPC server answers at {endpoint} ({why[0].strip()}); start one there with: "
                       "llama-fastgen rpc-server --port PORT")


def start_local(threads: int = 1, log=None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start `llama-fastgen rpc-server` on a free 127.0.0.1 port in a child process and wait until it listens
    (tests and benchmarks: a device backend on one machine). Returns the process, which the caller stops,
    and its "host:port"; the server's output goes to ``log`` (an open file) or nowhere."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "llama_fastgen", "rpc-server", "--port", str(port),
                             "--threads", str(threads)], stdout=out, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, f"127.0.0.1:{port}"
            except OSError:
                if proc.poll() is not None or time.time() - t0 > timeout:
                    break
                time.sleep(0.2)
    except BaseException:   # interrupted while waiting: the server goes too
        proc.kill()
        proc.wait()
        raise
    running = proc.poll() is None
    proc.kill()
    rc = proc.wait()
    raise RpcError(f"llama-fastgen rpc-server on port {port} "
                   + (f"did not listen within {timeout:.0f} s" if running else f"exited with code {rc}"))


def serve(host: str = "127.0.0.1", port: int = 50052, threads: int = 0) -> None:
    """Serve this machine's CPU backend until the process ends (what llama.cpp's rpc-server does)."""
    # llama.cpp's server only says that it stopped: name the reason first (an unknown host, a port in use)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server's own socket
            s.bind((host, port))
    except OSError as e:
        raise RpcError(f"cannot listen on {host}:{port} ({e})") from None
    load().llama_backend_init()
    native.lib.llama_fastgen_rpc_serve(f"{host}:{port}".encode(), threads or os.cpu_count() or 1)
    raise RpcError(native.last_error())
