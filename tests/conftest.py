"""Shared fixtures: the default real model, its stock GGUF, and a tiny random GQA model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEEDS = Path(os.environ.get("LLAMA_FASTGEN_SEEDS", REPO / "converter" / "calibration"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """HF directory of the default model (SmolLM2-135M-Instruct), prepared by scripts/prepare_model.py."""
    d = os.environ.get("MODEL_DIR")
    if d:
        return Path(d)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py")],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def stock_gguf(model_dir, tmp_path_factory) -> Path:
    """The default model converted by the pinned convert_hf_to_gguf.py, no fastgen metadata."""
    from llama_fastgen.converter.gguf_export import convert_stock

    out = tmp_path_factory.mktemp("stock") / "model-f32.gguf"
    convert_stock(model_dir, out, outtype="f32")
    return out


@pytest.fixture(scope="session")
def sample_text() -> str:
    from llama_fastgen.converter.calibration import load_texts

    return "\n\n".join(t for _, t in load_texts())
