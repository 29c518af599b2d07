"""The OpenAI endpoints' logic over the backend (vLLM's serving layer): a request body becomes one backend
request per choice; answers come back whole or as a server-sent event stream. A replica that fails is retried
once: before any token, the request is sent again; after some, it resumes on another replica from the prompt
and the tokens already streamed, which is lossless (greedy and seeded requests give the very same tokens).

The backend has the methods the app's docstring lists (cluster/api/app.py). OpenAIServing holds no route: the
app registers ``completions`` and ``chat_completions`` as its two POST handlers."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from onspec.actors.config import OnspecConfig
from onspec.cluster.api.errors import APIError
from onspec.cluster.api.metrics import Metrics, verification_steps
from onspec.cluster.api.protocol import (NEUTRAL_ONLY, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                         DetokenizeRequest, FunctionDef, OpenAIRequest, TokenizeRequest, read_json,
                                         validated)
from onspec.cluster.api.responses import ChatRender, CompletionRender, merge_usage, sse
from onspec.cluster.api.tool_parsers import tool_parser
from onspec.cluster.dashboard import History


def chat_messages(messages: list[ChatMessage], template_calls: bool = False) -> list[dict]:
    """Messages as the chat template takes them: text parts joined, "developer" as "system" (the template has
    no such role), a tool's answer under role "tool", and an assistant's earlier tool calls either as the JSON
    it wrote (a grammar-shaped call) or, with ``template_calls`` (tool_choice "auto"), as ``tool_calls`` for a
    template that renders them in the model's own call format."""
    out = []
    for m in messages:
        text = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        calls = [{"type": "function", "function": {"name": c.function.name, "arguments": _parsed(c.function.arguments)}}
                 for c in (m.tool_calls or []) if m.role == "assistant"]
        if calls and template_calls:
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
            continue
        if calls and not text:
            text = json.dumps([c["function"] for c in calls])
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if not any((m["content"] or "").strip() or m.get("tool_calls") for m in out):
        raise APIError(400, "the messages are empty", param="messages", code="empty_prompt")
    return [{**m, "content": m["content"] or ""} for m in out]


def _parsed(arguments: str | None):
    """A call's arguments as the JSON they are, or the text itself when a client sent something else."""
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


# ---- tool calls ----------------------------------------------------------------------------------------------
def tool_calls_wanted(req: ChatCompletionRequest, parser: str | None = None) -> list[FunctionDef] | str | None:
    """The functions a call must be made to (one: a named tool_choice; several: "required", the model picks),
    "auto" when the model decides (its text is read by ``parser``, server.tool_call_parser; without one "auto"
    is refused), or None when the answer is text."""
    tools = {t.function.name: t.function for t in req.tools or []}
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return None
    if not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format and a tool call cannot both shape the answer", param="response_format",
                       code="invalid_value")
    if choice == "auto":
        if parser is None:
            raise APIError(400, "tool_choice \"auto\" (the default with tools) needs a server started with "
                                "server.tool_call_parser and a chat template that renders tools; use \"required\", "
                                "name a function ({\"type\": \"function\", \"function\": {\"name\": ...}}) or "
                                "\"none\"", param="tool_choice", code="unsupported_value")
        return "auto"
    if choice == "required":
        return list(tools.values())
    if choice.function.name not in tools:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                       param="tool_choice", code="invalid_value")
    return [tools[choice.function.name]]


def tool_format(calls: list[FunctionDef]) -> dict:
    """The grammar of the answer: the one function's arguments, or {"name", "arguments"} of one of several."""
    def params(f: FunctionDef) -> dict:
        return f.parameters or {"type": "object"}
    if len(calls) == 1:
        schema = params(calls[0])
    else:
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": params(f)},
                             "required": ["name", "arguments"], "additionalProperties": False} for f in calls]}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema,
                                                   "strict": any(bool(f.strict) for f in calls)}}


def with_tools(messages: list[dict], calls: list[FunctionDef]) -> list[dict]:
    """The functions described to the model in the system message (the template has no place for tools), so
    that the arguments it writes under the grammar fit what was asked."""
    what = "Call this function" if len(calls) == 1 else "Call one of these functions"
    shape = "its arguments as a JSON object" if len(calls) == 1 else 'a JSON object {"name": ..., "arguments": ...}'
    lines = [f"{what}, answering with {shape} only."]
    for f in calls:
        lines.append(json.dumps({"name": f.name, "description": f.description or "",
                                 "parameters": f.parameters or {"type": "object"}}))
    text = "\n".join(lines)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


class OpenAIServing:
    def __init__(self, cfg: OnspecConfig, backend, metrics: Metrics, history: History):
        self.cfg, self.backend, self.metrics, self.history = cfg, backend, metrics, history
        self.model_name = cfg.server.served_model_name or cfg.model.name

    def record(self, label: str | None, usage: dict, replica: dict | None, t0: float,
               structured: bool = False) -> None:
        version, lab = self.metrics.finished(label, usage, replica, structured)
        self.history.add(version, lab, usage, verification_steps(usage), time.perf_counter() - t0)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found", type="not_found_error")

    async def parse(self, request: Request, schema: type[OpenAIRequest]) -> OpenAIRequest:
        req = validated(schema, await read_json(request, self.cfg.server.max_body_bytes))
        self.check_model(req.model)
        for name, neutral in NEUTRAL_ONLY.items():
            value = getattr(req, name, None)
            if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                             for v in neutral):
                raise APIError(400, f"{name} is not supported by this server (only {neutral[0]!r}, which means "
                                    "off, is accepted)", param=name, code="unsupported_value")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}", param="stop",
                           code="invalid_value")
        req.stop = [x for x in stops if x]
        if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return req

    def sampling(self, req: OpenAIRequest, max_tokens: int | None, default_max: int) -> dict:
        param = "max_completion_tokens" if isinstance(req, ChatCompletionRequest) and \
            req.max_completion_tokens is not None else "max_tokens"
        n = default_max if max_tokens is None else max_tokens
        echo = isinstance(req, CompletionRequest) and req.echo
        if n < (0 if echo else 1):  # 0 with echo: score the prompt, generate nothing (evaluation harnesses)
            raise APIError(400, f"{param} must be at least {0 if echo else 1}, got {n}", param=param,
                           code="invalid_value")
        if n > self.cfg.server.max_tokens_limit:
            raise APIError(400, f"{param} must be at most {self.cfg.server.max_tokens_limit}, got {n}", param=param,
                           code="invalid_value")
        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        out = {"max_tokens": n, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
               "seed": req.seed, "label": req.label, "request_id": uuid.uuid4().hex, "stop": req.stop,
               "logprobs": logprobs}
        if echo and logprobs is not None:
            out["prompt_logprobs"] = logprobs
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias maps token ids to a bias in [-100, 100]; got {key!r}: {value!r}",
                               param="logit_bias", code="invalid_value")
            bias[int(key)] = float(value)
        if req.min_tokens > n:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must be at most {param} ({n})", param="min_tokens",
                           code="invalid_value")
        out.update(frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                   repetition_penalty=req.repetition_penalty, logit_bias=bias, min_tokens=req.min_tokens,
                   ignore_eos=req.ignore_eos, min_p=req.min_p)
        return out

    def unavailable(self, e: Exception) -> APIError:
        if type(e).__name__ == "BackPressureError":  # Ray Serve's queue for the replicas is full
            return APIError(429, "every replica is busy and the queue is full; retry shortly", type="rate_limit_error",
                            code="overloaded")
        return APIError(503, f"no replica could serve the request: {type(e).__name__}", type="server_error",
                        code="unavailable")

    def choices(self, req: OpenAIRequest, payload: dict) -> list[dict]:
        """One backend request per choice: its own request id and, when seeded, its own seed."""
        return [{**payload, "request_id": uuid.uuid4().hex if i else payload["request_id"],
                 "seed": None if req.seed is None else (req.seed + i) % 2**64} for i in range(req.n)]

    async def complete_once(self, payload: dict) -> dict:
        """A replica that dies takes nothing the client saw: retry once on another one."""
        for attempt in (0, 1):
            try:
                return await self.backend.complete(payload)
            except Exception as e:  # noqa: BLE001 -- the replica is gone or overloaded
                if attempt or type(e).__name__ == "BackPressureError":
                    raise self.unavailable(e) from None
                payload = {**payload, "request_id": uuid.uuid4().hex}
                self.metrics.retried.inc()

    async def events_once(self, payload: dict):
        """The backend's event stream, surviving one replica failure: before any token the request is sent again;
        after some, it goes on from them on another replica (the prompt and the tokens streamed so far become the
        new prompt: the continuation is what the target would have sampled next, and greedy or seeded requests
        give the very same tokens)."""
        prompt_ids, out, sent = None, [], ""
        for attempt in (0, 1):
            events = self.backend.stream(payload)
            try:
                async for ev in events:
                    if ev["type"] == "start":
                        if prompt_ids is not None:
                            continue  # the resumed request's own start: the client saw one already
                        prompt_ids = ev.get("prompt_ids")
                    elif ev["type"] == "delta":
                        out += ev["token_ids"]
                        sent += ev["text"]
                    yield ev
                return
            except Exception as e:  # noqa: BLE001
                if attempt or type(e).__name__ == "BackPressureError" or (out and prompt_ids is None):
                    raise
                payload = {**payload, "request_id": uuid.uuid4().hex}
                if out:
                    payload["resume"] = {"prompt_ids": prompt_ids, "output_ids": out, "sent": sent}
                self.metrics.retried.inc()
            finally:
                await events.aclose()

    def refusal(self, status: int, error: dict) -> JSONResponse:
        return JSONResponse({"error": error}, status_code=status,
                            headers={"Retry-After": "1"} if status == 429 else None)

    async def call(self, endpoint: str, req: OpenAIRequest, payload: dict, render) -> Any:
        t0 = time.perf_counter()
        if req.stream:
            return await self.stream(endpoint, req, self.choices(req, payload), render, t0)
        results = await asyncio.gather(*(self.complete_once(p) for p in self.choices(req, payload)))
        for res in results:
            if res["type"] == "error":
                self.metrics.requests.labels(endpoint, str(res["status"])).inc()
                return self.refusal(res["status"], res["error"])
        for res in results:
            self.record(req.label, res["usage"], res.get("replica"), t0, payload.get("response_format") is not None)
        self.metrics.requests.labels(endpoint, "200").inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return render.full(results, merge_usage([r["usage"] for r in results]))

    async def stream(self, endpoint: str, req: OpenAIRequest, payloads: list[dict], render, t0: float):
        gens = [self.events_once(p) for p in payloads]

        async def first_of(gen):
            return await gen.__anext__()

        try:
            firsts = await asyncio.gather(*(first_of(g) for g in gens))
        except Exception as e:  # noqa: BLE001 -- any failure to start a stream is a 503 (or 429)
            for g in gens:
                await g.aclose()
            raise self.unavailable(e) from None
        for first in firsts:
            if first["type"] == "error":
                for g in gens:
                    await g.aclose()
                self.metrics.requests.labels(endpoint, str(first["status"])).inc()
                return self.refusal(first["status"], first["error"])
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen, first: dict) -> None:
            try:
                await merged.put((i, first))
                async for ev in gen:
                    await merged.put((i, ev))
            except Exception as e:  # noqa: BLE001 -- the replica died mid-stream: say so in the stream
                await merged.put((i, {"type": "error", "error": {"message": f"generation failed: "
                                      f"{type(e).__name__}", "type": "server_error", "param": None, "code": None}}))
            finally:
                await merged.put((i, None))

        async def body():
            tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
            ended, usages, failed = set(), [], False
            first_token = True
            try:
                for i in range(len(gens)):
                    for chunk in render.opening(i):
                        yield sse(chunk)
                open_ = len(gens)
                while open_:
                    i, ev = await merged.get()
                    if ev is None:
                        open_ -= 1
                    elif ev["type"] == "start" and render.echo is not None:
                        yield sse(render.delta(render.echo, i, ev.get("prompt_logprobs")))
                    elif ev["type"] == "delta":
                        if first_token:
                            self.metrics.ttft.observe(time.perf_counter() - t0)
                            first_token = False
                        chunk = render.delta(ev["text"], i, ev.get("logprobs")) \
                            if ev["text"] or ev.get("logprobs") else None
                        if chunk is not None:
                            yield sse(chunk)
                    elif ev["type"] == "end":
                        ended.add(i)
                        usages.append(ev["usage"])
                        self.record(req.label, ev["usage"], ev.get("replica"), t0,
                                    payloads[i].get("response_format") is not None)
                        for chunk in render.finish(ev["finish_reason"], i):
                            yield sse(chunk)
                    elif ev["type"] == "error":
                        failed = True
                        yield sse({"error": ev["error"]})
                if len(ended) < len(gens) and not failed:
                    yield sse({"error": {"message": "generation ended early", "type": "server_error",
                                         "param": None, "code": None}})
                if include_usage and usages:
                    yield sse(render.usage(merge_usage(usages)))
                yield "data: [DONE]\n\n"
                self.metrics.requests.labels(endpoint, "200").inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            finally:
                if len(ended) < len(gens):
                    self.metrics.cancelled.inc()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # Closing the backend streams cancels the generations on the replicas (client disconnects too).
                for g in gens:
                    await g.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(self, request: Request):
        req = await self.parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be a string or a list of exactly one string", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        payload = {"prompt": prompt, **self.sampling(req, req.max_tokens, 16)}
        if req.response_format is not None:
            payload["response_format"] = req.response_format.grammar()
        render = CompletionRender(self.model_name, echo=prompt if req.echo else None)
        return await self.call("completions", req, payload, render)

    async def chat_completions(self, request: Request):
        req = await self.parse(request, ChatCompletionRequest)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        parser = self.cfg.server.tool_call_parser
        calls = tool_calls_wanted(req, parser)
        payload = {"messages": chat_messages(req.messages, template_calls=calls == "auto"),
                   **self.sampling(req, limit, 256)}
        if calls == "auto":  # the template describes the tools; the parser reads calls from the text
            payload["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
            render = ChatRender(self.model_name, auto=(tool_parser(parser), {t.function.name for t in req.tools}))
            return await self.call("chat_completions", req, payload, render)
        if calls is not None:
            payload["messages"] = with_tools(payload["messages"], calls)
            payload["response_format"] = tool_format(calls)
        elif req.response_format is not None:
            payload["response_format"] = req.response_format.grammar()
        return await self.call("chat_completions", req, payload, ChatRender(self.model_name, calls))

    async def tokenize(self, request: Request):
        """vLLM's POST /tokenize: {count, max_model_len, tokens[, token_strs]}."""
        req = validated(TokenizeRequest, await read_json(request, self.cfg.server.max_body_bytes))
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        payload = {"prompt": req.prompt, "return_token_strs": req.return_token_strs}
        if req.messages is not None:
            payload = {"messages": chat_messages(req.messages), "return_token_strs": req.return_token_strs}
        return self.answer(await self.backend.tokenize(payload))

    async def detokenize(self, request: Request):
        """vLLM's POST /detokenize: {prompt}, the text of the token ids."""
        req = validated(DetokenizeRequest, await read_json(request, self.cfg.server.max_body_bytes))
        self.check_model(req.model)
        return self.answer(await self.backend.detokenize({"tokens": req.tokens}))

    def answer(self, res: dict) -> dict | JSONResponse:
        if res["type"] == "error":
            return self.refusal(res["status"], res["error"])
        return {k: v for k, v in res.items() if k != "type"}
