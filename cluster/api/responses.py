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


class CalledFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


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
    tool_calls: list[ToolCallDelta] | None = None


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

    def finish(self, reason: str, i: int = 0) -> list[dict]:
        return [self._base(choices=[{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])]

    def usage(self, usage: dict) -> dict:
        return self._base(choices=[], usage=usage)


class ChatRender(CompletionRender):
    """Chat answers; with ``calls`` (the functions a tool call must be made to) the text the grammar shaped is a
    call: one function's arguments, or {"name", "arguments"} of one of several."""
    object = "chat.completion"

    def __init__(self, model: str, calls: list | None = None, auto: tuple | None = None):
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.calls = calls
        # tool_choice "auto": (parser, the offered functions' names); the model's text is a call or an answer
        self.auto = auto
        self.streamed: dict[int, str] = {}  # per choice: the call's text so far (streams)
        self.shown: dict[int, int] = {}     # auto, per choice: characters of that text sent as content

    def _call(self, text: str) -> dict | None:
        """The tool call a choice's text makes (None while it is not yet a complete call of several)."""
        if len(self.calls) == 1:
            name, args = self.calls[0].name, text
        else:
            try:
                made = json.loads(text)
            except ValueError:
                return None
            name, args = made["name"], json.dumps(made["arguments"])
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": args}}

    def _message(self, r: dict) -> tuple[dict, str]:
        if self.auto:
            content, made = self.auto[0].parse(r["text"], self.auto[1])
            if not made:
                return {"role": "assistant", "content": r["text"]}, r["finish_reason"]
            reason = "tool_calls" if r["finish_reason"] == "stop" else r["finish_reason"]
            return {"role": "assistant", "content": content, "tool_calls": made}, reason
        call = self._call(r["text"]) if self.calls else None
        if call is None:
            return {"role": "assistant", "content": r["text"]}, r["finish_reason"]
        reason = "tool_calls" if r["finish_reason"] == "stop" else r["finish_reason"]
        return {"role": "assistant", "content": None, "tool_calls": [call]}, reason

    def full(self, results: list[dict], usage: dict) -> dict:
        choices = []
        for i, r in enumerate(results):
            message, reason = self._message(r)
            choices.append({"index": i, "message": message, "logprobs": chat_logprobs(r.get("logprobs")),
                            "finish_reason": reason})
        return self._base(choices=choices, usage=usage)

    def _chunk(self, **kw) -> dict:
        return {**self._base(**kw), "object": "chat.completion.chunk"}

    def opening(self, i: int) -> list[dict]:
        content = None if self.calls else ""
        return [self._chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": content},
                                      "logprobs": None, "finish_reason": None}])]

    def delta(self, text: str, i: int = 0, logprobs: list | None = None) -> dict | None:
        if self.auto:  # text goes out up to where a call may begin; a call goes out whole when the text ends
            full = self.streamed[i] = self.streamed.get(i, "") + text
            sent = self.shown.get(i, 0)
            self.shown[i] = max(sent, self.auto[0].safe_length(full))
            if self.shown[i] == sent and not logprobs:
                return None
            return self._chunk(choices=[{"index": i, "delta": {"content": full[sent:self.shown[i]]},
                                         "logprobs": chat_logprobs(logprobs), "finish_reason": None}])
        if not self.calls:
            return self._chunk(choices=[{"index": i, "delta": {"content": text},
                                         "logprobs": chat_logprobs(logprobs), "finish_reason": None}])
        first = i not in self.streamed
        self.streamed[i] = self.streamed.get(i, "") + text
        if len(self.calls) > 1:
            return None  # the function's name comes inside the text: the call is sent whole at the end
        call = {"index": 0, "function": {"arguments": text}}
        if first:  # one function: its arguments stream as they are written
            call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": self.calls[0].name, "arguments": text}}
        return self._chunk(choices=[{"index": i, "delta": {"tool_calls": [call]},
                                     "logprobs": chat_logprobs(logprobs), "finish_reason": None}])

    def finish(self, reason: str, i: int = 0) -> list[dict]:
        if self.auto:
            full, sent = self.streamed.get(i, ""), self.shown.get(i, 0)
            _, made = self.auto[0].parse(full, self.auto[1])
            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(made)]} if made else \
                {"content": full[sent:]} if len(full) > sent else None
            out = [] if delta is None else [self._chunk(choices=[{"index": i, "delta": delta, "logprobs": None,
                                                                   "finish_reason": None}])]
            reason = "tool_calls" if made and reason == "stop" else reason
            return out + [self._chunk(choices=[{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])]
        out, call = [], None
        if self.calls and (len(self.calls) > 1 or i not in self.streamed):
            # Several functions: the call goes out whole now (its name was inside the text); one function
            # with nothing streamed: its (empty) call still has to be announced.
            text = self.streamed.get(i, "")
            call = self._call(text)
            delta = {"tool_calls": [{"index": 0, **call}]} if call else {"content": text}  # cut short: text
            out.append(self._chunk(choices=[{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
        if self.calls and reason == "stop" and (call is not None or len(self.calls) == 1):
            reason = "tool_calls"
        out.append(self._chunk(choices=[{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out

    def usage(self, usage: dict) -> dict:
        return self._chunk(choices=[], usage=usage)
