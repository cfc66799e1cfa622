"""llama.cpp's own llama-server on our libllama (scripts/build_tools.sh) with parallel slots: four
concurrent greedy requests must give the answers of the same four requests one by one (the oracle of
issue 15: several sequences decoded together = each alone), with the fastgen cache on, for both of
llama.cpp's KV layouts (a stream per slot, and one unified buffer). Heavy-hitter heads keep one
sequence: there the server must stop with the reason instead of serving something else."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_fastgen import schema
from llama_fastgen.converter import gguf_export
from test_native import TINY_BASE
from test_serving import _free_port, mixed_gguf  # noqa: F401  (the heavy-hitter fixture)

REPO = Path(__file__).resolve().parent.parent
# ~250-300 tokens each, past the window (16) of the compressed class, so every slot evicts
PROMPTS = [f"List {k}: " + ", ".join(f"item {i} is {(i * (k + 3)) % 13}" for i in range(36)) + f". Which item is {k}?"
           for k in range(4)]
GREEDY = {"n_predict": 24, "temperature": 0.0, "seed": 7, "cache_prompt": False}


@pytest.fixture(scope="module")
def server_bin() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "build_tools.sh"), "llama-server"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-server"


@pytest.fixture(scope="module")
def static_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model with a full and a windowed class in every layer (no heavy hitters)."""
    kv = {**TINY_BASE, "fastgen.class.kind": ("i32[]", [0, 3]), "fastgen.class.window": ("i32[]", [0, 16]),
          "fastgen.layer_class_heads": ("i32[]", [1, 1] * 4)}
    return gguf_export.convert(tiny_model_dir, tmp_path_factory.mktemp("llama-server") / "static.gguf", "f32", extra_kv=kv)


class LlamaServer:
    def __init__(self, binary, gguf, log, *args):
        self.port, self.log = _free_port(), log
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-c", "2048",
               "-ub", "64", "-b", "256", "-t", str(os.cpu_count() or 2), "--no-warmup", "-lv", "4", *args]
        env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)

    def wait_ready(self, timeout=180.0) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"llama-server not ready after {timeout} s:\n{self.log.read_text()[-2000:]}")

    def complete(self, prompt: str) -> list[int]:
        body = json.dumps({"prompt": prompt, "return_tokens": True, **GREEDY}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["tokens"]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.log.read_text()


@pytest.mark.parametrize("layout", ["per-slot", "unified"])
def test_four_parallel_slots_answer_as_one_request_at_a_time(server_bin, static_gguf, tmp_path, layout):
    srv = LlamaServer(server_bin, static_gguf, tmp_path / "server.log", "-np", "4",
                      "-kvu" if layout == "unified" else "-no-kvu")
    try:
        assert srv.wait_ready(), srv.stop()[-3000:]
        alone = [srv.complete(p) for p in PROMPTS]
        with ThreadPoolExecutor(4) as ex:
            together = list(ex.map(srv.complete, PROMPTS))
    finally:
        log = srv.stop()
    assert all(len(a) == GREEDY["n_predict"] for a in alone), alone
    assert together == alone
    # the per-class cache served them (its log lines), the compressed class sized by the formula for
    # 4 sequences in one buffer, or for one per stream of n_ctx / 4
    cells = re.search(r"class 1 special\+punct\+local16 +4 heads, +(\d+) cells", log)
    assert cells and "instead of" in log, log[-3000:]
    meta = schema.read(static_gguf)
    expect = (schema.class_capacity(meta, 1, 2048, 64, n_seq=4) if layout == "unified"
              else schema.class_capacity(meta, 1, 2048 // 4, 64))
    assert int(cells.group(1)) == expect


def test_parallel_slots_with_heavy_hitter_heads_stop_with_the_reason(server_bin, mixed_gguf, tmp_path):  # noqa: F811
    srv = LlamaServer(server_bin, mixed_gguf, tmp_path / "server.log", "-np", "4")
    ready = srv.wait_ready()
    log = srv.stop()
    assert not ready and srv.proc.returncode not in (0, None)
    assert "n_seq_max = 1" in log, log[-3000:]
