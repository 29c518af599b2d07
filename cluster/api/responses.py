"""The OpenAI API's response side: the response models (what the OpenAPI schema declares and tests check
answers against) and the renderers that build each endpoint's answers, whole or as stream chunks."""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    acceptance_rate: float
    drafted_tokens: int
    accepted_tokens: int
    tokens_per_step: float
    drafter_version: str | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token (nothing before it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Unready(BaseModel):
    status: Literal["unavailable"]
    reason: str


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- OpenAI response shapes ---------------------------------------------------------------------------------
def merge_usage(usages: list[dict]) -> dict:
    """One usage for n choices: the prompt counted once (as OpenAI does), the rest summed."""
    if len(usages) == 1:
        return usages[0]
    out = dict(usages[0])
    for key in ("completion_tokens", "drafted_tokens", "accepted_tokens"):
        out[key] = sum(u.get(key) or 0 for u in usages)
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["acceptance_rate"] = round(out["accepted_tokens"] / out["drafted_tokens"], 4) if out["drafted_tokens"] \
        else 0.0
    return out


def completion_logprobs(items: list | None, offset: int = 0) -> dict | None:
    """/v1/completions' logprobs object from (token text, logprob, [(text, logprob)]) triples."""
    if items is None:
        return None
    offsets, at = [], offset
    for text, _, _ in items:
        offsets.append(at)
        at += len(text)
    return {"tokens": [t for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [None if lp is None else dict(top) for _, lp, top in items], "text_offset": offsets}


def chat_logprobs(items: list | None) -> dict | None:
    """/v1/chat/completions' logprobs object (content: one entry per token, with its alternatives)."""
    if items is None:
        return None

    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in items]}


class CompletionRender:
    object = "text_completion"

    def __init__(self, model: str, echo: str | None = None):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.echo = echo  # the prompt, which each choice's text then starts with
        self.offsets: dict[int, int] = {}  # per choice: characters streamed (logprobs' text_offset)

    def _base(self, **kw) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, **kw}

    def full(self, results: list[dict], usage: dict) -> dict:
        return self._base(choices=[{"index": i, "text": (self.echo or "") + r["text"],
                                    "logprobs": completion_logprobs(self._echoed(r)),
                                    "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                          usage=usage)

    def _echoed(self, r: dict) -> list | None:
        """The logprobs items of a choice, the prompt's first when it is echoed."""
        if r.get("logprobs") is None and r.get("prompt_logprobs") is None:
            return None
        return (r.get("prompt_logprobs") or []) + (r.get("logprobs") or [])

    def opening(self, i: int) -> list[dict]:
        return []

    def delta(self, text: str, i: int = 0, logprobs: list | None = None) -> dict:
        lp = completion_logprobs(logprobs, self.offsets.get(i, 0))
        self.offsets[i] = self.offsets.get(i, 0) + len(text)
        return self._base(choices=[{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])

    def finish(self, reason: str, i: int = 0) -> dict:
        return self._base(choices=[{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: dict) -> dict:
        return self._base(choices=[], usage=usage)


class ChatRender(CompletionRender):
    object = "chat.completion"

    def __init__(self, model: str):
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def full(self, results: list[dict], usage: dict) -> dict:
        return self._base(choices=[{"index": i, "message": {"role": "assistant", "content": r["text"]},
                                    "logprobs": chat_logprobs(r.get("logprobs")),
                                    "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                          usage=usage)

    def _chunk(self, **kw) -> dict:
        return {**self._base(**kw), "object": "chat.completion.chunk"}

    def opening(self, i: int) -> list[dict]:
        return [self._chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])]

    def delta(self, text: str, i: int = 0, logprobs: list | None = None) -> dict:
        return self._chunk(choices=[{"index": i, "delta": {"content": text}, "logprobs": chat_logprobs(logprobs),
                                     "finish_reason": None}])

    def finish(self, reason: str, i: int = 0) -> dict:
        return self._chunk(choices=[{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: dict) -> dict:
        return self._chunk(choices=[], usage=usage)
