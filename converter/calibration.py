"""Calibration texts for profiling: varied material the project may ship.

The bundled default (converter/calibration/) is prose and Q&A written for this project, plus
generated lists and the converter's own source code. Dialogue is rendered through the model's
chat template at tokenization time, so control tokens appear where they will at chat time.
A user set is a text file or a directory of .txt files (one prompt per file).
"""
from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIALOGUE_SEP = "\n===\n"


def _generated_lists(seed: int = 7) -> str:
    """Deterministic inventory, schedule and to-do lists: numbers, units, bullets, short lines."""
    rng = random.Random(seed)
    items = ["flour", "rice", "lentils", "olive oil", "tomatoes", "onions", "garlic", "butter", "eggs",
             "yoghurt", "apples", "lemons", "coffee", "tea", "oats", "honey", "salt", "pepper"]
    units = ["kg", "g", "l", "ml", "pcs", "jars", "packs"]
    rooms = ["kitchen", "hall", "study", "garden", "garage", "attic", "cellar"]
    verbs = ["clean", "repaint", "sort", "fix", "measure", "label", "empty", "check"]
    out = ["Pantry inventory (updated weekly)", ""]
    for i, it in enumerate(rng.sample(items, len(items)), 1):
        out.append(f"{i:2d}. {it:<10} {rng.randint(1, 40):>3} {rng.choice(units):<5} "
                   f"best before 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
    out += ["", "Weekly schedule:", ""]
    for day in ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]:
        h = rng.randint(7, 10)
        out.append(f"- {day}: {h:02d}:00 run {rng.randint(3, 12)} km; {h + 9:02d}:30 "
                   f"{rng.choice(verbs)} the {rng.choice(rooms)}; budget EUR {rng.randint(5, 90)}.{rng.randint(0, 99):02d}")
    out += ["", "To do:", ""]
    for _ in range(40):
        out.append(f"[{'x' if rng.random() < 0.4 else ' '}] {rng.choice(verbs)} {rng.choice(items)} "
                   f"in the {rng.choice(rooms)} ({rng.randint(5, 120)} min, priority {rng.randint(1, 3)})")
    return "\n".join(out)


def _code() -> str:
    files = sorted(p for p in HERE.glob("*.py") if p.name != "__init__.py")
    return "\n\n".join(f"# file: {p.name}\n{p.read_text()}" for p in files)


def load_texts(source: str | Path | None = None) -> list[tuple[str, str]]:
    """Return [(name, text)]. Raises ValueError for an empty or missing set."""
    if source is None:
        d = HERE / "calibration"
        texts = [("prose", (d / "prose.txt").read_text()),
                 ("dialogue", (d / "dialogue.txt").read_text()),
                 ("lists", _generated_lists()),
                 ("code", _code())]
    else:
        p = Path(source)
        if p.is_dir():
            texts = [(f.stem, f.read_text(errors="replace")) for f in sorted(p.glob("*.txt"))]
        elif p.is_file():
            texts = [(p.stem, p.read_text(errors="replace"))]
        else:
            raise ValueError(f"calibration set {p} does not exist")
    texts = [(n, t) for n, t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration set {source} holds no text (expected .txt files with content)")
    return texts


def to_token_ids(tokenizer, name: str, text: str, max_tokens: int) -> list[int]:
    """Tokenize one calibration text; Q&A blocks become a chat through the model's template."""
    blocks = text.split(DIALOGUE_SEP) if DIALOGUE_SEP in text else None
    if blocks and getattr(tokenizer, "chat_template", None):
        messages = []
        for b in blocks:
            q, _, a = b.strip().partition("\n")
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    # Long texts are repeated up to the budget only if too short to show window effects.
    while len(ids) < max_tokens // 2:
        ids = ids + ids
    return ids[:max_tokens]
