"""`llama-fastgen chat`: talk to a GGUF through plain llama_cpp.Llama, streaming."""
from __future__ import annotations

import sys
import time

SCRIPTED = [
    "What is the capital of France? Answer in one sentence.",
    "Give me two short tips for keeping bread fresh.",
]


def load(model_path: str, n_ctx: int):
    from . import llama_cpp  # our libllama

    return llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, flash_attn=True, verbose=False)


def reply(llm, messages: list[dict], max_tokens: int, out=sys.stdout) -> str:
    text, t0, n = [], time.time(), 0
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                            stream=True):
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if piece:
            out.write(piece)
            out.flush()
            text.append(piece)
            n += 1
    dt = time.time() - t0
    from . import native

    held = sum(c["used"] for c in native.cache_stats(llm)["classes"])
    extra = f", {held} cells held over all classes" if held else ""
    out.write(f"\n   [{n} tokens, {n / max(dt, 1e-9):.1f} tok/s{extra}]\n")
    return "".join(text)


def run(model_path: str, prompts: list[str] | None, n_ctx: int, max_tokens: int) -> int:
    from . import native
    from .schema import KIND_NAMES, Kind

    llm = load(model_path, n_ctx)
    st = native.cache_stats(llm)
    if st["fastgen"]:
        print(f"KV cache: {st['kv_bytes'] / 2**20:.1f} MiB allocated instead of {st['full_bytes'] / 2**20:.1f} MiB "
              f"({1 - st['kv_bytes'] / st['full_bytes']:.0%} saved) at n_ctx {n_ctx}, "
              f"{len(st['classes'])} head classes")
        if st["kv_bytes"] >= st["full_bytes"] and any(c["class"] != KIND_NAMES[Kind.FULL] for c in st["classes"]):
            print(f"  (at n_ctx {n_ctx} the classes' cells reach the context: this policy saves memory only at a "
                  f"larger --n-ctx)")
    else:
        print(f"KV cache: full ({st['kv_bytes'] / 2**20:.1f} MiB at n_ctx {n_ctx}; no fastgen policy in this GGUF)")
    messages: list[dict] = []
    interactive = prompts is None and sys.stdin.isatty()
    if prompts == ["-"]:  # turns from standard input, one per line (read to its end first)
        prompts = [ln.strip() for ln in sys.stdin if ln.strip()]
    elif prompts is None and not interactive:  # (a pipe that never closes must not hang the demo)
        print("(standard input is not a terminal: the scripted demo turns; --prompt - reads turns from it)")
    todo = iter(prompts or SCRIPTED) if not interactive else None
    if interactive:
        print("chat with the model; an empty line or Ctrl-D ends")
    while True:
        if interactive:
            try:
                user = input("you> ").strip()
            except EOFError:
                break
            if not user:
                break
        else:
            user = next(todo, None)
            if user is None:
                break
            print(f"you> {user}")
        messages.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        messages.append({"role": "assistant", "content": reply(llm, messages, max_tokens)})
    llm.close()
    return 0
