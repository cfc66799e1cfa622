"""The measuring child of scripts/eval.py: python -m llama_fastgen.evaluation.worker JOB.json."""
from __future__ import annotations

# our libllama before numpy (numpy first, then a CUDA libllama: the first decode segfaults on the H200)
from llama_fastgen import llama_cpp  # noqa: F401,E402  isort: skip

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from llama_fastgen.evaluation import configs  # noqa: E402
from llama_fastgen.evaluation.configs import Config  # noqa: E402
from llama_fastgen.evaluation.measure import memory, memory_at, quality, retrieval, speed, teacher_forced  # noqa: E402


def sections(job: dict) -> dict:
    """The measuring child: every section of the run, saved to the JSON after each step (--resume)."""
    out, t_start, a_json = job["out"], job["t_start"], job["json"] and Path(job["json"])
    cfgs = [Config(**c) for c in job["cfgs"]]

    def save():
        out["seconds"], out["complete"] = round(time.time() - t_start), False
        if a_json:
            a_json.write_text(json.dumps(out, indent=1))

    out["memory_at_ctx"] = memory_at(cfgs, job["ctx"], job["ubatch"])
    if "quality" in job["sections"]:   # the cheaper section first
        quality(cfgs, job["text_ids"], [tuple(r) for r in job["ranges"]], job["ubatch"], rows=out["quality"], on_row=save)
    if "retrieval" in job["sections"]:
        ret = [c for c in cfgs if c.kv == "f16" or c.name == "full q8_0"]
        retrieval(ret, job["prompts"], job["lengths"], job["trials"], job["tasks"], job["ubatch"], on_cell=save,
                  rows=out["retrieval"])
    if "memory" in job["sections"]:
        out["memory"] = memory([c for c in cfgs if c.kv == "f16" or c.name in ("full q8_0", "full q4_0")], job["contexts"])
        save()
    if "speed" in job["sections"]:
        speed_cfgs = [c for c in cfgs if c.family in ("full", "fastgen", "fastgen mass-only") or c.name == "full q8_0"]
        out["speed"] = speed(speed_cfgs, job["text_ids"], [0, 2048, 8000])
    return out


def worker(path: Path) -> int:
    job = json.loads(path.read_text())
    configs.GPU_LAYERS = job["gpu"]
    import llama_fastgen  # noqa: F401  (our libllama before llama_cpp loads its own)

    assert "torch" not in sys.modules, "the measuring process must not import torch (see in_child)"
    if job["job"] == "bytes":
        result = teacher_forced(Config(**job["cfg"]), [1, 2, 3], job["n_ctx"], n_ubatch=job["ubatch"])[1]["kv_bytes"]
    else:
        result = sections(job)
    path.write_text(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
