"""Shared fixtures: the default real model, its stock GGUF, and a tiny random GQA model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def _tiny_model(model_dir, out: Path, hidden: int, n_head: int) -> Path:
    """A tiny random GQA Llama (4 layers, n_head query / 2 KV heads) with the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                      num_attention_heads=n_head, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper attention than the default init, so policies differ per head
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir, tmp_path_factory) -> Path:
    """A tiny random GQA Llama (4 layers, 8 query / 2 KV heads of 8 dimensions)."""
    return _tiny_model(model_dir, tmp_path_factory.mktemp("tiny"), 64, 8)


@pytest.fixture(scope="session")
def tiny_d32_model_dir(model_dir, tmp_path_factory) -> Path:
    """The same with heads of 32 dimensions (4 query / 2 KV heads), a size the fused heavy-hitter op takes."""
    return _tiny_model(model_dir, tmp_path_factory.mktemp("tiny32"), 128, 4)


@pytest.fixture(scope="session")
def long_ids(model_dir):
    """1,700 tokens of the calibration texts: past every window and budget of the test profiles."""
    from transformers import AutoTokenizer

    from llama_fastgen.converter.calibration import load_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\n".join(t for _, t in load_texts()))["input_ids"][:1700]
    assert len(ids) == 1700
    return ids
