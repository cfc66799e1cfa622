"""Helpers shared by tests: llama.cpp logits through llama-cpp-python with our library."""
from __future__ import annotations

import numpy as np


def llama_logits(gguf, ids: list[int], n_ctx: int = 2048, n_batch: int = 64, flash_attn: bool = False,
                 **kw) -> np.ndarray:
    from llama_fastgen.logits import teacher_forced

    return teacher_forced(gguf, ids, n_ctx=n_ctx, n_batch=n_batch, flash_attn=flash_attn, **kw)[0]


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess on a free port, its stderr in `log`: ready when `ready_path`
    answers 200, stopped with its log returned."""

    ready_path = "/health"

    def start(self, cmd: list[str], log, env=None):
        import subprocess

        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)

    def wait_ready(self, timeout=180.0) -> bool:
        """True once ready_path answers; False when the process exits first."""
        import time
        import urllib.error
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> str:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.log.read_text()

