"""Synthetic long-context tasks for scripts/eval.py, generated offline by code.

passkey  the classic filler ("The grass is green. ...") with one line "The pass key is N.
         Remember it. N is the pass key." at a given depth; the model completes
         "What is the pass key? The pass key is".
needle   a prose haystack (Python's own documentation, pydoc_data.topics) with one sentence
         "The secret number of <city> is N." at a given depth; the model completes
         "What is the secret number of <city>? The secret number of <city> is".
A trial succeeds when the greedy continuation (8 tokens) contains N. Keys come from a seeded RNG.
"""
from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Tunis", "Riga"]


def held_out_text(n_chars: int = 400000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def _fit(tok, head: str, body_unit: str, needle: str, tail: str, n_tokens: int, depth: float) -> list[int]:
    """head + body (cut to length) with `needle` inserted at `depth` of the body + tail, ~n_tokens."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    fixed = len(enc(head)) + len(enc(needle)) + len(enc(tail))
    unit = enc(body_unit)
    body = (unit * (1 + (n_tokens - fixed) // max(1, len(unit))))[: max(0, n_tokens - fixed)]
    cut = int(len(body) * depth)
    # cut at a token that starts a sentence-ish boundary: keep it simple, the model sees raw tokens
    return enc(head) + body[:cut] + enc(needle) + body[cut:] + enc(tail)


def passkey(tok, n_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    key = str(random.Random(seed).randint(10000, 99999))
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    return _fit(tok, head, FILLER, needle, tail, n_tokens, depth), key


def needle(tok, n_tokens: int, depth: float, seed: int, haystack: str | None = None) -> tuple[list[int], str]:
    rng = random.Random(seed)
    city, key = rng.choice(CITIES), str(rng.randint(10000, 99999))
    head = "Read the document and answer the question at the end.\n\n"
    sentence = f" The secret number of {city} is {key}. "
    tail = f"\n\nWhat is the secret number of {city}? The secret number of {city} is"
    return _fit(tok, head, haystack or held_out_text(), sentence, tail, n_tokens, depth), key


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
