"""Which token ids count as special and as punctuation (the protected sets of FastGen)."""
from __future__ import annotations

import string

_PUNCT = set(string.punctuation) | set("“”‘’–—…«»¿¡·")


def special_ids(tokenizer) -> list[int]:
    """BOS/EOS/control tokens: every special or added-special token of the tokenizer."""
    ids = set(tokenizer.all_special_ids)
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return sorted(i for i in ids if i is not None and i >= 0)


def punct_ids(tokenizer) -> list[int]:
    """Pieces made only of punctuation and whitespace, holding at least one punctuation mark or
    newline (as Cold Compress's FastGen does: '^[\\s<punct>]*$'); plain spaces are excluded."""
    special = set(special_ids(tokenizer))
    out = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        s = tokenizer.decode([tid])
        if not s or not all(c in _PUNCT or c.isspace() for c in s):
            continue
        if any(c in _PUNCT or c == "\n" for c in s):
            out.append(tid)
    return out
