"""Every architecture the converter supports runs through the native cache like the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import llama_logits
from llama_fastgen import schema
from llama_fastgen.converter import convert, reference
from llama_fastgen.converter.calibration import load_texts
from llama_fastgen.converter.profiling import token_context


def _tiny(arch: str, tok, out):
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg, cls = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    extra = {"head_dim": 8} if arch == "qwen3" else {}
    torch.manual_seed(1)
    model = cls(cfg(**common, **extra))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# qwen2 is missing here (its real-model oracle: scripts/native_vs_reference.py, docs/RESULTS.md): the
# pinned converter does not recognise the SmolLM2 tokenizer's pre-tokenizer
# under a Qwen2 config ("BPE pre-tokenizer was not recognized"), and no small real Qwen2 fits CI.
@pytest.mark.parametrize("ladder", ["static", "frequent"])
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_native_cache_matches_reference(arch, ladder, model_dir, tmp_path):
    """Static ladder: the same keys, so top-1 >= 99%. Full ladder: random weights attend almost
    uniformly, so heavy-hitter scores nearly tie and f16 (native) vs f32 (reference) rounding may
    evict a different token now and then; the real model's test holds frequent heads to 99%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    d = _tiny(arch, tok, tmp_path / arch)
    g = tmp_path / f"{arch}.gguf"
    assert convert.main([str(d), "--profile", "--outfile", str(g), "--outtype", "f32", "--threshold", "0.6",
                         "--max-tokens", "256", "--no-quality", "--no-retrieval"] + (["--no-frequent"] if ladder == "static" else [])) == 0
    meta = schema.read(g)
    assert any(c.kind != schema.Kind.FULL for c in meta.classes)
    ids = tok("\n\n".join(t for _, t in load_texts()))["input_ids"][:700]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ctx = token_context(ids, set(meta.special_token_ids), set(meta.punct_token_ids), meta.n_sink)
    ref = reference.logits(m, ids, meta.at_context(1024).original_head_policies(), ctx, chunks=64).numpy()[300:]  # ubatches of 64, as native
    nat = llama_logits(g, ids, n_ctx=1024)[300:]
    assert (schema.Kind.FREQUENT in {c.kind for c in meta.classes}) == (ladder == "frequent")
    assert (nat.argmax(-1) == ref.argmax(-1)).mean() >= (0.99 if ladder == "static" else 0.97)
    assert np.abs(nat - ref).mean() < 0.01
    # and the eviction shows: native is far closer to the reference of the same keep-sets than to the full cache
    # (measured 28x to 1000x)
    full = reference.logits(m, ids, None, None).numpy()[300:]
    assert np.abs(nat - full).mean() > 10 * np.abs(nat - ref).mean(), (np.abs(nat - full).mean(), np.abs(nat - ref).mean())
