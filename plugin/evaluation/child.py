"""Measuring jobs run in a child process (llama_fastgen.evaluation.worker)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def in_child(job: dict):
    """Run a measuring job in a child process that never imports torch: torch's CUDA libraries and
    ggml's in one process crash (seen on the H200), and on the CPU it keeps libllama apart too."""
    from llama_fastgen.evaluation import configs

    with tempfile.TemporaryDirectory(prefix="fastgen-eval-job-") as d:
        path = Path(d) / "job.json"
        path.write_text(json.dumps({**job, "gpu": configs.GPU_LAYERS}, default=str))
        r = subprocess.run([sys.executable, "-m", "llama_fastgen.evaluation.worker", str(path)])
        if r.returncode != 0:
            raise SystemExit(f"eval: the measuring process failed (exit {r.returncode})")
        return json.loads(path.read_text())["result"]
