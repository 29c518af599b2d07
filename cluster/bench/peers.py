"""Peers a user would pick instead, decoding the same GGUF file in the same run (`bench decode --peer`).

llama.cpp (through llama-cpp-python, an optional extra) reads the very file onspec serves, so the two are
compared on equal weights: plainly, and with its prompt-lookup drafting (the model-free drafting onspec's
suffix source generalises). Both get the prompt's token ids, decode greedily and stop at the engine's stop
tokens, so token counts match; tokens/s include the prompt's prefill, as onspec's do.
"""
from __future__ import annotations

import time

PEERS = ("llamacpp",)


class PeerMissing(RuntimeError):
    """The peer's package is not installed; the message says how to get it."""


class LlamaCppPeer:
    """llama.cpp on ``gguf_path`` with ``threads`` threads, plain and with prompt-lookup drafting."""

    name = "llamacpp"

    def __init__(self, gguf_path: str, threads: int, n_ctx: int, lookup_tokens: int = 10):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as e:
            raise PeerMissing("--peer llamacpp needs llama-cpp-python: pip install 'onspec[peers]' "
                              "(it compiles llama.cpp, a few minutes)") from e
        kw = dict(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                  verbose=False)
        self.plain = Llama(**kw)
        self.lookup = Llama(**kw, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens))
        self.lookup_tokens = lookup_tokens

    def generate(self, ids: list[int], max_tokens: int, stop_ids: set[int], lookup: bool) -> tuple[list[int], float]:
        """Greedy tokens after ``ids`` (at most ``max_tokens``, ending at a stop token) and the seconds taken."""
        llm = self.lookup if lookup else self.plain
        out: list[int] = []
        t = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if tok in stop_ids or len(out) >= max_tokens:
                break
        return out, time.perf_counter() - t


def make_peer(name: str, gguf_path: str, threads: int, n_ctx: int):
    if name == "llamacpp":
        return LlamaCppPeer(gguf_path, threads, n_ctx)
    raise ValueError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")


def agreement(a: list[int], b: list[int]) -> float:
    """How much of two greedy outputs agree: the common prefix over the longer one's length (1.0: identical).
    Different kernels round differently, so a peer's greedy text may part from onspec's after a near-tie."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)
