"""Grammar-constrained decoding for structured outputs (OpenAI ``response_format`` and tool-call arguments).

One job: turn a response format into per-position masks of allowed tokens over the target's vocabulary, in a
shape that fits speculative verification. For a round with drafts d_1..d_k, row j of ``masks_for(drafts)`` is
the grammar's mask after d_1..d_j (row 0: before any draft; row k: the bonus position). The engine applies
the rows to the TARGET's logits before verifying, so a draft the grammar forbids has probability 0 and is
rejected like any mismatch, and the correction/bonus token is drawn from the masked distribution. This keeps
verification lossless with respect to the grammar-constrained target. Only ``commit`` advances the state.

Engine: xgrammar. Measured on this (shared, 2-core) CPU with the SmolLM2 tokenizer (vocab 49152;
scripts/bench_grammar.py, table in docs/structured_outputs.md): xgrammar compiles json_object in 4-6 ms and
an 8-property schema in 20-54 ms, fills a mask in ~5 us per position (worst ~100 us), and rolls back any
number of tokens. llguidance compiles lazily (~1 ms) but fills masks 6x slower (28-91 us, worst 1.5-7 ms),
a cost that would sit inside every round; outlines-core builds a DFA over the vocabulary up front (0.6-0.9 s
for the schema, 6-10 s for json_object, which it can only approximate as a bounded-depth regex). The mask
is paid k+1 times per round and compile once per schema (cached), so the per-position cost decided it;
vLLM and SGLang drive xgrammar's rollback the same way.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch
import xgrammar as xgr

# A compiled grammar holds 60 KB (json_object) to ~1 MB (an 8-property schema); a bounded cache keeps a
# stream of distinct one-off schemas (every tool set is its own) from growing the replica without limit.
CACHE_SIZE = 256


class CompiledGrammar:
    """A compiled response format: immutable, shared by every request that uses the same schema."""

    def __init__(self, grammar: xgr.CompiledGrammar, key: str, compiler: "GrammarCompiler"):
        self.grammar, self.key, self.compiler = grammar, key, compiler

    def constraint(self) -> "Constraint":
        return Constraint(self)


class GrammarCompiler:
    """Built once per tokenizer (and per replica): the tokenizer's token table takes ~0.1 s to prepare.

    ``vocab_size`` is the target's lm_head width; when it exceeds the tokenizer's vocabulary, the extra
    ids are never allowed. ``stop_token_ids`` (default: the tokenizer's EOS) are allowed only where the
    document is complete.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, stop_token_ids: Iterable[int] | None = None,
                 max_threads: int = 2):
        self.vocab_size = int(vocab_size) if vocab_size is not None else len(tokenizer)
        stops = sorted(set(stop_token_ids)) if stop_token_ids else [int(tokenizer.eos_token_id)]
        self.stop_token_ids = stops
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                        stop_token_ids=stops)
        self._xgr = xgr.GrammarCompiler(self._info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def compile(self, response_format: dict | None) -> CompiledGrammar | None:
        """{"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
        {"type": "text"} or None gives None (no constraint). ValueError names what is wrong."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            # Any object (not any JSON value): that is what OpenAI's json_object promises.
            return self.compile_schema({"type": "object"}, strict=False, what="json_object")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
            name = spec.get("name", "")
            schema = spec.get("schema", {"type": "object"})  # OpenAI defaults an absent schema to any object
            return self.compile_schema(schema, strict=bool(spec.get("strict", False)),
                                       what=f"response_format.json_schema {name!r}")
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")

    def compile_tool(self, tool: dict) -> CompiledGrammar:
        """The arguments of one function call: {"type": "function", "function": {"name", "parameters",
        "strict"}} or the bare function object. Arguments are always a JSON object."""
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError("a tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return self.compile_schema(params, strict=bool(fn.get("strict", False)),
                                   what=f"parameters of tool {fn['name']!r}")

    def compile_schema(self, schema: dict | str, strict: bool = False, what: str = "schema") -> CompiledGrammar:
        """``strict`` follows OpenAI: unspecified additionalProperties/items mean none allowed; otherwise the
        schema's own JSON Schema defaults apply (extra properties allowed)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{what}: schema must be a JSON object")
        # Not sort_keys: properties are generated in the schema's order, so order is part of the grammar.
        text = json.dumps(schema, separators=(",", ":"))
        key = f"{int(strict)}:{text}"
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            grammar = self._xgr.compile_json_schema(text, strict_mode=strict, any_whitespace=True)
        except RuntimeError as e:
            raise ValueError(f"{what}: invalid or unsupported JSON schema: {_clean(e)}") from None
        out = self._cache[key] = CompiledGrammar(grammar, key, self)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def constraint(self, response_format: dict | None) -> "Constraint | None":
        g = self.compile(response_format)
        return None if g is None else g.constraint()


def _clean(e: Exception) -> str:
    # xgrammar prefixes "[hh:mm:ss] /project/cpp/file.cc:123: " to its messages; the user needs the rest.
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", str(e).strip()).replace("Check failed: (error.empty()) is "
                                                                            "false: ", "")


class Constraint:
    """The grammar state of one request. Not thread-safe: one request, one engine thread."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.vocab_size = compiled.compiler.vocab_size
        self._stops = torch.tensor(compiled.compiler.stop_token_ids)
        self._m = xgr.GrammarMatcher(compiled.grammar)
        self._buf = xgr.allocate_token_bitmask(9, self.vocab_size)  # grows on demand; k+1 rows per round

    # -- masks ---------------------------------------------------------------------------------------------
    def allowed(self) -> torch.Tensor:
        """Bool[V]: the tokens the grammar allows next."""
        return self.masks_for([])[0]

    def bitmasks_for(self, drafts: list[int]) -> torch.Tensor:
        """Int32[len(drafts)+1, ceil(V/32)], xgrammar's packed layout (bit i of word w is token 32w+i), for
        ``xgrammar.apply_token_bitmask_inplace`` (CPU and GPU kernels; 32x less to copy to the device than
        bool). Same rows as ``masks_for``. The returned tensor is a view of a reused buffer: use or copy it
        before the next call."""
        rows = len(drafts) + 1
        if self._buf.shape[0] < rows:
            self._buf = xgr.allocate_token_bitmask(rows, self.vocab_size)
        buf = self._buf[:rows]
        walked = 0
        for j in range(rows):
            if self._m.is_terminated():
                # Past an accepted stop token nothing can follow; verification has stopped before here.
                buf[j:] = -1
                break
            self._m.fill_next_token_bitmask(buf, j)
            if j == len(drafts):
                break
            if not self._m.accept_token(int(drafts[j])):
                # d_{j+1} is illegal, so verification rejects it at row j and never reads the later rows.
                # All-allowed (not all-forbidden) keeps softmax over those rows finite if a caller
                # computes them anyway.
                buf[j + 1:] = -1
                break
            walked += 1
        if walked:
            self._m.rollback(walked)
        return buf

    def masks_for(self, drafts: list[int]) -> torch.Tensor:
        """Bool[len(drafts)+1, V]. Row j: the tokens allowed after the committed tokens plus d_1..d_j, i.e.
        the mask for the target's logits at verified position j (row len(drafts) is the bonus position).
        If d_{j+1} is illegal (or d_j was a stop token), rows j+1.. are all True: verification stops at
        the first rejection, so they are never used. The matcher ends where it started."""
        return unpack(self.bitmasks_for(drafts), self.vocab_size)

    # -- drafting ------------------------------------------------------------------------------------------
    def advance(self, tokens: Iterable[int]) -> int:
        """Accept ``tokens`` up to the first the grammar forbids; returns how many were taken. For drafting
        only: ``rewind`` undoes it (``commit`` is what advances for good)."""
        n = 0
        for t in tokens:
            if not self._m.accept_token(int(t)):
                break
            n += 1
        return n

    def rewind(self, n: int) -> None:
        if n:
            self._m.rollback(n)

    # -- state ---------------------------------------------------------------------------------------------
    def commit(self, tokens: Iterable[int]) -> None:
        """Advance for good by the tokens the round emitted (accepted drafts + correction/bonus). A token
        the grammar forbids raises ValueError: the engine sampled outside the mask, a bug."""
        for i, t in enumerate(tokens):
            if not self._m.accept_token(int(t)):
                raise ValueError(f"token {int(t)} (position {i} of this commit) is not allowed by the grammar")

    def is_complete(self) -> bool:
        """The text so far is a whole valid document (a stop token would be accepted now)."""
        return self._m.is_terminated() or self._m.is_completed()

    def is_finished(self) -> bool:
        """Nothing but a stop token may follow (or one was committed): the request can end here without
        spending a forward on EOS."""
        if self._m.is_terminated():
            return True
        if not self._m.is_completed():
            return False
        row = self.allowed()
        row[self._stops] = False
        return not bool(row.any())

    def fork(self) -> "Constraint":
        """An independent copy of the current state: for a drafter to mask its own proposals token by token
        (commit on the copy) without touching this one."""
        other = Constraint.__new__(Constraint)
        other.__dict__.update(self.__dict__)
        other._m = self._m.fork()
        other._buf = xgr.allocate_token_bitmask(self._buf.shape[0], self.vocab_size)
        return other

    def reset(self) -> None:
        self._m.reset()


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Int32[R, W] packed masks -> Bool[R, vocab_size]."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # little-endian words
    return torch.from_numpy(bits[:, :vocab_size]).view(torch.bool)


def mask_logits_(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Forbidden tokens to -inf, in place. ``logits`` [R, V'] with V' >= masks' V (extra columns forbidden)."""
    v = masks.shape[-1]
    if logits.shape[-1] > v:
        logits[..., v:] = float("-inf")
    logits[..., :v].masked_fill_(~masks.to(logits.device, non_blocking=True), float("-inf"))
    return logits
