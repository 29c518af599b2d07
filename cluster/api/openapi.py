"""The app's OpenAPI schema.

The generation and admin routes parse their bodies themselves (read_json + validated: 413 before parsing, 400s
in OpenAI's shape), so FastAPI cannot see them: ``openapi_schema`` declares every route's body, answers and
refusals from OPENAPI_ROUTES, and the 401/403/429 of AuthMiddleware from required_scope, the same rule it applies.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from onspec.cluster.api.auth import required_scope
from onspec.cluster.api.protocol import (ENDPOINTS, NEUTRAL_ONLY, VERSION_PATTERN, ChatCompletionRequest,
                                         CompletionRequest, DetokenizeRequest, PromoteBody, RollbackBody,
                                         TokenizeRequest)
from onspec.cluster.api.responses import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk,
                                          ErrorResponse, ModelList, Unready)

_JSON, _SSE, _OBJECT = "application/json", "text/event-stream", {"type": "object"}
_TEXT = {"type": "string"}


class _Events:
    """A text/event-stream answer: each event's data is a JSON ``chunk`` or error, or the final [DONE]."""

    def __init__(self, chunk: type[BaseModel]):
        self.chunk = chunk
# (path, method) -> body: request body model (optional: may be empty), ok: {media type: model or JSON schema},
# errors: statuses the route itself may answer (AuthMiddleware's are added by required_scope).
OPENAPI_ROUTES: dict[tuple[str, str], dict] = {
    ("/v1/completions", "post"): {"body": CompletionRequest, "ok": {_JSON: Completion, _SSE: _Events(CompletionChunk)},
                                  "errors": (400, 404, 413, 503)},
    ("/v1/chat/completions", "post"): {"body": ChatCompletionRequest,
                                       "ok": {_JSON: ChatCompletion, _SSE: _Events(ChatCompletionChunk)},
                                       "errors": (400, 404, 413, 503)},
    ("/v1/models", "get"): {"ok": {_JSON: ModelList}},
    ("/tokenize", "post"): {"body": TokenizeRequest, "ok": {_JSON: _OBJECT}, "errors": (400, 404, 413, 503)},
    ("/detokenize", "post"): {"body": DetokenizeRequest, "ok": {_JSON: _OBJECT}, "errors": (400, 404, 413, 503)},
    ("/healthz", "get"): {"ok": {_JSON: _OBJECT}},
    ("/health", "get"): {"ok": {_JSON: _OBJECT}, "errors": {503: Unready}},
    ("/version", "get"): {"ok": {_JSON: _OBJECT}},
    ("/readyz", "get"): {"ok": {_JSON: _OBJECT}, "errors": {503: Unready}},
    ("/metrics", "get"): {"ok": {"text/plain": _TEXT}},
    ("/v1/admin/trainer", "get"): {"ok": {_JSON: _OBJECT}, "errors": (503,)},
    ("/v1/admin/drafters", "get"): {"ok": {_JSON: _OBJECT}, "errors": (503,)},
    ("/v1/admin/drafters/{version}", "get"): {"ok": {_JSON: _OBJECT}, "errors": (400, 404, 503)},
    ("/v1/admin/drafters/rollback", "post"): {"body": RollbackBody, "optional": True, "ok": {_JSON: _OBJECT},
                                              "errors": (400, 404, 409, 413, 503)},
    ("/v1/admin/drafters/{version}/promote", "post"): {"body": PromoteBody, "optional": True,
                                                       "ok": {_JSON: _OBJECT}, "errors": (400, 404, 409, 413, 503)},
    ("/dashboard", "get"): {"ok": {"text/html": _TEXT}},
    ("/dashboard/static/{name}", "get"): {"ok": {"text/javascript": _TEXT, "text/css": _TEXT}, "errors": (404,)},
    ("/dashboard/data", "get"): {"ok": {_JSON: _OBJECT}, "errors": (400,)},
}
_AUTH_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 403: {"WWW-Authenticate": "Bearer ... insufficient_scope"},
                 429: {"Retry-After": "seconds"}}


def _declare_limits(models: dict, model_name: str, max_tokens_limit: int) -> None:
    """What the request models leave to the handlers, declared in the schema: the one served model, at most 4
    stop sequences, max_tokens' range, one prompt per request."""
    null = {"type": "null"}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = models[name]["properties"]
        props["model"] = {"anyOf": [{"type": "string", "const": model_name}, null], "default": None,
                          "description": "the served model (GET /v1/models); another one is a 404"}
        props["stop"] = {"anyOf": [null, {"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                                "maxItems": 4}],
                         "default": None, "description": "up to 4 strings; the text ends before the first"}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_tokens_limit}, null],
                                "default": None}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = models[name]["properties"]
        for field, neutral in NEUTRAL_ONLY.items():
            if field in props:
                props[field] = {"anyOf": [{"enum": list(neutral)}, null], "default": None,
                                "description": "not supported: only the value that means off (400 otherwise)"}
    models["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}],
        "description": "one prompt (a list of exactly one string is accepted too)"}


def openapi_schema(app: FastAPI, auth: bool, model_name: str, max_tokens_limit: int) -> dict:
    """The app's OpenAPI schema (cached on the app); ``auth``: keys are configured (bearer security declared)."""
    from http import HTTPStatus

    from onspec.cluster.dashboard import STATIC

    schema = get_openapi(title="onspec", version="1", routes=app.routes,
                         description="OpenAI-compatible completions with online speculative decoding; errors are "
                                     "{\"error\": {message, type, param, code}} (docs/serving.md, "
                                     "docs/security.md)")
    comps = schema.setdefault("components", {})
    models = comps.setdefault("schemas", {})

    def ref(model) -> dict:
        if isinstance(model, _Events):
            payload = {"type": "string", "contentMediaType": _JSON,
                       "contentSchema": {"anyOf": [ref(model.chunk), ref(ErrorResponse)]}}
            return {"type": "object", "required": ["data"],
                    "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}
        if not isinstance(model, type):
            return model
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        models.update(js.pop("$defs", {}))
        models[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            spec = OPENAPI_ROUTES.get((path, method), {})
            errors = spec.get("errors", ())
            errors = dict(errors) if isinstance(errors, dict) else dict.fromkeys(errors, ErrorResponse)
            scope = required_scope(path)
            if auth and scope:
                errors[401] = ErrorResponse
                op["security"] = [{"bearer": []}]
                if scope == "admin":
                    errors[403] = ErrorResponse
                if path in ENDPOINTS:
                    errors[429] = ErrorResponse
            op["responses"] = {"200": {"description": "OK", "content": {
                media: {"schema": ref(m)} for media, m in spec.get("ok", {_JSON: _OBJECT}).items()}}}
            for status, model in sorted(errors.items()):
                answer = {"description": HTTPStatus(status).phrase, "content": {_JSON: {"schema": ref(model)}}}
                if status in _AUTH_HEADERS:
                    answer["headers"] = {h: {"required": True, "description": d, "schema": {"type": "string"}}
                                         for h, d in _AUTH_HEADERS[status].items()}
                op["responses"][str(status)] = answer
            if "body" in spec:
                op["requestBody"] = {"required": not spec.get("optional"),
                                     "content": {_JSON: {"schema": ref(spec["body"])}}}
            for param in op.get("parameters", ()):  # what the handlers check themselves (400 / 404)
                if param["in"] == "path" and param["name"] == "version":
                    param["schema"] = {"type": "string", "pattern": VERSION_PATTERN}
                elif param["in"] == "path" and param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": sorted(STATIC)}
    _declare_limits(models, model_name, max_tokens_limit)
    models.pop("HTTPValidationError", None)  # FastAPI's 422s: parameter errors are 400s here
    models.pop("ValidationError", None)
    if auth:
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description":
                                               "an API key; /v1/admin/* needs an admin key"}}
    app.openapi_schema = schema
    return schema
