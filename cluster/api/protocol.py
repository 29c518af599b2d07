"""The OpenAI API's request side: request bodies as pydantic models (every field honoured, a declared no-op, or
refused), and the reading of a body (size limit, JSON, the model's checks) into one, with OpenAI's 400s."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from onspec.cluster.api.errors import APIError

LABEL_PATTERN = r"^[A-Za-z0-9_.:/-]{1,64}$"
VERSION_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


def _json_number(value):
    """Numbers as JSON has them: pydantic's lax int and float would also take true or "0.5", which the schema
    (and OpenAI) do not allow; 3.0 stays an integer, as in JSON Schema."""
    if isinstance(value, (bool, str)):
        raise ValueError("expected a number")
    return value


Int = Annotated[int, BeforeValidator(_json_number)]
Float = Annotated[float, BeforeValidator(_json_number)]


MAX_CHOICES = 8  # n: at most one batch of rows per request


# OpenAI fields that change nothing about the output: accepted and not used.
NO_OP_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")
# OpenAI fields onspec does not implement yet: accepted only with the value that means "off" (clients send
# response_format: {"type": "text"} and friends explicitly); any other value is refused with a 400 naming the
# field, never accepted and dropped.
NEUTRAL_ONLY = {"functions": ([],), "function_call": ("none",), "parallel_tool_calls": (True, False),
                "modalities": (["text"],), "best_of": (1,), "suffix": ("",)}


class OpenAIRequest(BaseModel):
    # Every field is honoured, a declared no-op, or refused (extra="forbid": an unknown field is a 400).
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: Int | None = None
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, description="onspec extension: 0 = no top-k cut")
    seed: Int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="torch's seed range")
    n: Int = Field(1, ge=1, le=MAX_CHOICES, description="choices per request (each decoded as its own sequence "
                                                        "of the batch)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    label: str | None = Field(None, pattern=LABEL_PATTERN,
                              description="onspec extension: tags traffic (domain, tenant) in the stream and "
                                          "the metrics")
    user: str | None = Field(None, description="accepted, not used")
    metadata: dict[str, str] | None = Field(None, description="accepted, not used")
    store: StrictBool | None = Field(None, description="accepted, not used")
    service_tier: str | None = Field(None, description="accepted, not used")
    safety_identifier: str | None = Field(None, description="accepted, not used")
    prompt_cache_key: str | None = Field(None, description="accepted, not used")
    # Sampling controls, applied to the target's distribution at every verified position (speculation stays
    # lossless under them): OpenAI's, then vLLM's extensions.
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0, description="logit -= count in the output * this")
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0, description="logit -= this once in the output")
    logit_bias: dict[str, Float] | None = Field(None, max_length=1024,
                                                description="token id (a string, as OpenAI) -> bias in [-100, 100]")
    repetition_penalty: Float = Field(1.0, gt=0.0, le=10.0, description="vLLM extension: tokens of the prompt or "
                                                                        "output have positive logits divided and "
                                                                        "negative ones multiplied by this")
    min_tokens: Int = Field(0, ge=0, description="vLLM extension: no end of sequence before this many tokens")
    ignore_eos: StrictBool = Field(False, description="vLLM extension: generate max_tokens, past end of sequence")
    min_p: Float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension: sampling drops tokens below min_p times "
                                                          "the likeliest one's probability")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's structured outputs: text (free), json_object (any JSON object), json_schema (that schema)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def grammar(self) -> dict | None:
        """What the engine's grammar compiler takes (actors/grammar.py), or None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise APIError(400, "response_format.json_schema is required with type json_schema",
                           param="response_format.json_schema", code="invalid_value")
        return self.model_dump(by_alias=True, exclude_none=True)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    best_of: Any = Field(None, description="not supported: only 1 (400 otherwise)")
    echo: StrictBool = Field(False, description="the prompt before the completion in text (and in logprobs: "
                                                "its tokens' log-probabilities, the first null); with max_tokens 0 "
                                                "the prompt is only scored")
    suffix: Any = Field(None, description="not supported: only \"\" (400 otherwise)")
    logprobs: Int | None = Field(None, ge=0, le=5, description="log-probabilities of the chosen tokens and of the "
                                                              "likeliest this many, under the target")
    response_format: ResponseFormat | None = Field(None, description="vLLM extension on completions: as chat's")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments (default: any "
                                                                "object)")
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="\"required\" or a named function: the arguments are generated under the function's "
                          "schema; \"auto\": the model decides, read by server.tool_call_parser "
                          "through a chat template that renders tools (400 without them)")
    functions: Any = Field(None, description="not supported: only [] (400 otherwise)")
    function_call: Any = Field(None, description="not supported: only \"none\" (400 otherwise)")
    parallel_tool_calls: Any = Field(None, description="accepted as a boolean; onspec makes one call per choice")
    modalities: Any = Field(None, description="only [\"text\"] (400 otherwise)")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or messages (chat template and generation prompt applied, as generation does)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Int] = Field(max_length=1_000_000)


class _AdminBody(BaseModel):
    # Strict: a misspelt "version" in a rollback must not silently roll back to the predecessor instead.
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


class PromoteBody(_AdminBody):
    pass


class RollbackBody(_AdminBody):
    version: str | None = Field(None, pattern=VERSION_PATTERN)


async def read_json(request: Request, limit: int, empty: Any = ...) -> Any:
    """The request's JSON body, at most ``limit`` bytes; ``empty`` (when given) stands for an empty body."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked upload stops being read at the limit
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip() and empty is not ...:
        return empty
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None


def validated(schema: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"{loc}: unknown field; this server does not support it (docs/serving.md lists "
                                "the fields it takes)", param=loc, code="unsupported_field") from None
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc,
                       code="invalid_value") from None
