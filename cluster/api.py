"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray: it talks to a *backend* with three methods:

    async complete(request: dict) -> dict         a replica result or an error event (actors/replica.py)
    stream(request: dict) -> AsyncIterator[dict]  replica events; closing it early must stop generation
    async ready() -> dict                         Replica.ready()
    async stats() -> dict                         Replica.stats()

and optionally ``async trainer() -> dict | None`` (the online trainer's state).
cluster/serve.py passes a backend over Ray Serve deployment handles; tests may pass a local one.
Every refusal is a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}.
The same app serves the drafter registry's admin endpoints (/v1/admin/drafters...) when Redis is configured,
/metrics (Prometheus) and the dashboard (/dashboard, cluster/dashboard.py).

With keys configured (server.api_keys / admin_keys / the key files), every route but /healthz, /readyz, /metrics
and the dashboard's page and static files needs ``Authorization: Bearer <key>``; /v1/admin/* needs an admin key
(docs/security.md). ``create_app(...).openapi()`` is the API's OpenAPI schema, request bodies and refusals
included (tests/test_fuzz.py fuzzes the app from it).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from onspec.actors.config import OnspecConfig
from onspec.cluster.dashboard import History, add_dashboard_routes
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

LABEL_PATTERN = r"^[A-Za-z0-9_.:/-]{1,64}$"
VERSION_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
MAX_METRIC_LABELS = 32  # distinct `label` values given their own metric series; the rest count as "other"
MAX_METRIC_VERSIONS = 32  # distinct drafter versions given their own series; later ones count as "other"
REPLICA_STALE_S = 300.0  # a replica not heard from for this long is left out of the drafter-version gauge
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape does not wait longer than this for a replica, the trainer or Redis


# ---- request schemas ----------------------------------------------------------------------------------------
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
# frequency_penalty: 0 and friends explicitly); any other value is refused with a 400 naming the field, never
# accepted and dropped.
NEUTRAL_ONLY = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
                "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
                "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (True, False),
                "modalities": (["text"],), "best_of": (1,), "echo": (False,), "suffix": ("",)}


class _Request(BaseModel):
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
    frequency_penalty: Any = Field(None, description="not supported: only 0 (400 otherwise)")
    presence_penalty: Any = Field(None, description="not supported: only 0 (400 otherwise)")
    logit_bias: Any = Field(None, description="not supported: only {} (400 otherwise)")


class CompletionRequest(_Request):
    prompt: str | list[str]
    best_of: Any = Field(None, description="not supported: only 1 (400 otherwise)")
    echo: Any = Field(None, description="not supported: only false (400 otherwise)")
    suffix: Any = Field(None, description="not supported: only \"\" (400 otherwise)")
    logprobs: Int | None = Field(None, ge=0, le=5, description="log-probabilities of the chosen tokens and of the "
                                                              "likeliest this many, under the target")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: Any = Field(None, description="not supported: only {\"type\": \"text\"} (400 otherwise)")
    tools: Any = Field(None, description="not supported: only [] (400 otherwise)")
    tool_choice: Any = Field(None, description="not supported: only \"none\" (400 otherwise)")
    functions: Any = Field(None, description="not supported: only [] (400 otherwise)")
    function_call: Any = Field(None, description="not supported: only \"none\" (400 otherwise)")
    parallel_tool_calls: Any = Field(None, description="accepted as a boolean; no tools, so nothing to do")
    modalities: Any = Field(None, description="only [\"text\"] (400 otherwise)")


class _AdminBody(BaseModel):
    # Strict: a misspelt "version" in a rollback must not silently roll back to the predecessor instead.
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


class PromoteBody(_AdminBody):
    pass


class RollbackBody(_AdminBody):
    version: str | None = Field(None, pattern=VERSION_PATTERN)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param,
                                                    "code": code}}


def error_response(status: int, error: dict) -> JSONResponse:
    return JSONResponse({"error": error}, status_code=status)


# ---- authentication and per-key limits (docs/security.md) -----------------------------------------------------
OPEN_PATHS = frozenset({"/healthz", "/health", "/readyz", "/version", "/metrics", "/dashboard"})  # no key needed, like vLLM's /health
OPEN_PREFIXES = ("/dashboard/static/",)
ADMIN_PREFIX = "/v1/admin"


def required_scope(path: str) -> str | None:
    """None (open), "api" (an API or an admin key) or "admin" (an admin key). Anything not listed as open needs
    a key: an unknown path answers 401 to a client without one, 404 to one with one."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "api"


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class Keys:
    """The configured keys, held as SHA-256 digests. A presented key is hashed and compared with every one of
    them (hmac.compare_digest over equal-length digests, no early exit): the time taken says neither which key
    nor how much of one matched."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self.api = [_digest(k.encode()) for k in api_keys]
        self.admin = [_digest(k.encode()) for k in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def check(self, presented: bytes) -> tuple[str | None, str]:
        """(scope of the key: "admin", "api" or None for no valid key, an id for the key: a hash, not the key)."""
        d = _digest(presented)
        admin = api = False
        for k in self.admin:
            admin |= hmac.compare_digest(d, k)
        for k in self.api:
            api |= hmac.compare_digest(d, k)
        return ("admin" if admin else "api" if api else None), d.hex()[:16]


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key of ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``); None if neither is there."""
    found = {}
    for name, value in headers:
        if name in (b"authorization", b"x-api-key") and name not in found:
            found[name] = value
    if b"authorization" in found:
        scheme, _, token = found[b"authorization"].strip().partition(b" ")
        return (token.strip() or None) if scheme.lower() == b"bearer" else None
    return found.get(b"x-api-key", b"").strip() or None


class Limiter:
    """Requests in flight per key on the generation endpoints (one event loop: no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}  # key id (a hash) -> requests

    def acquire(self, key_id: str) -> bool:
        n = self.in_flight.get(key_id, 0)
        if self.limit and n >= self.limit:
            return False
        self.in_flight[key_id] = n + 1
        return True

    def release(self, key_id: str) -> None:
        n = self.in_flight.get(key_id, 0) - 1
        if n > 0:
            self.in_flight[key_id] = n
        else:
            self.in_flight.pop(key_id, None)


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class AuthMiddleware:
    """Bearer keys and the per-key concurrency limit, as plain ASGI: a streaming response stays inside
    ``__call__`` until its last byte or the client's disconnect, so the slot is released exactly then."""

    def __init__(self, app, keys: Keys, limiter: Limiter, refused=None):
        self.app, self.keys, self.limiter, self.refused = app, keys, limiter, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        need = required_scope(path)
        if need is None:
            return await self.app(scope, receive, send)
        token = presented_key(scope["headers"])
        if token is None:
            return await self._refuse(scope, receive, send, path, 401, "no API key: send the header "
                                      "'Authorization: Bearer <key>'", "invalid_api_key")
        have, key_id = self.keys.check(token)
        if have is None:
            return await self._refuse(scope, receive, send, path, 401, "the API key is not valid",
                                      "invalid_api_key")
        if need == "admin" and have != "admin":
            return await self._refuse(scope, receive, send, path, 403, f"{path} needs the admin scope: an admin "
                                      "key (server.admin_keys, --admin-key-file); the key sent is an API key",
                                      "insufficient_scope", type="permission_error")
        if not (path in ENDPOINTS and scope["method"] == "POST" and self.limiter.limit):
            return await self.app(scope, receive, send)
        if not self.limiter.acquire(key_id):
            return await self._refuse(scope, receive, send, path, 429, "too many concurrent requests with this "
                                      f"key: at most {self.limiter.limit} in flight (server.max_concurrent_per_"
                                      "key); retry once one has finished", "rate_limit_exceeded",
                                      type="rate_limit_error")
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(key_id)

    async def _refuse(self, scope, receive, send, path: str, status: int, message: str, code: str,
                      type: str = "invalid_request_error"):
        headers = {401: {"WWW-Authenticate": "Bearer"},
                   403: {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="admin"'},
                   429: {"Retry-After": "1"}}[status]
        if self.refused is not None:
            self.refused(path, status)
        body = {"error": {"message": message, "type": type, "param": None, "code": code}}
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


# ---- metrics ------------------------------------------------------------------------------------------------
def _bounded(value: str, seen: set[str], cap: int) -> str:
    """``value``, or "other" once ``cap`` distinct values have their own series (a client cannot blow up the
    number of series by sending a new label with every request)."""
    if value in seen or len(seen) < cap:
        seen.add(value)
        return value
    return "other"


def verification_steps(usage: dict) -> int:
    """Target forward passes of a request (prefill included), recovered from usage's rounded tokens_per_step:
    exact up to ~8000 steps, far beyond max_tokens_limit's default."""
    tps = usage.get("tokens_per_step") or 0
    return round(usage["completion_tokens"] / tps) if tps > 0 else 0


class Metrics:
    """A private prometheus_client registry of what passes through this ingress, plus what the ingress fetches
    at each scrape: the engine replicas' logger counters and drafter versions (they also ride along with every
    finished request), the trainer's state and the registry's serving version and history."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("onspec_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("onspec_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("onspec_time_to_first_token_seconds", "time to the first token (streams)",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.prompt_tokens = Counter("onspec_prompt_tokens", "prompt tokens", ["label"], registry=r)
        self.completion_tokens = Counter("onspec_completion_tokens", "generated tokens", ["label"], registry=r)
        self.drafted = Counter("onspec_spec_draft_tokens", "drafted tokens", ["label"], registry=r)
        self.accepted = Counter("onspec_spec_accepted_tokens", "accepted draft tokens", ["label"], registry=r)
        self.cancelled = Counter("onspec_requests_cancelled", "streams the client left early", registry=r)
        self.retried = Counter("onspec_requests_retried", "requests sent again to another replica after theirs "
                                                          "failed before streaming a token", registry=r)
        self._per_version(r)
        self.replicas: dict[str, dict] = {}
        self.seen: dict[str, float] = {}  # replica id -> when it last reported
        self.trainer: dict | None = None  # the trainer's state at the last scrape (None: no trainer answered)
        self.drafters: dict | None = None  # {"serving", "history"} from the registry at the last scrape
        self._labels: set[str] = set()
        self._versions: set[str] = set()
        r.register(self)

    def _per_version(self, r: CollectorRegistry) -> None:
        # The drift views: the same figures split by the drafter version that served the request.
        by = ["drafter_version", "label"]
        self.served = Counter("onspec_served_requests", "requests answered in full", by, registry=r)
        self.generated = Counter("onspec_generated_tokens", "generated tokens", by, registry=r)
        self.drafted_by = Counter("onspec_drafted_tokens", "drafted tokens", by, registry=r)
        self.accepted_by = Counter("onspec_accepted_tokens", "accepted draft tokens", by, registry=r)
        self.steps = Counter("onspec_verification_steps", "target forward passes, prefill included (decoding "
                             "with the target alone takes one per generated token)", by, registry=r)
        self.acceptance = Histogram("onspec_request_acceptance_rate", "accepted / drafted of one request "
                                    "(requests that drafted nothing are not observed)", ["drafter_version"],
                                    registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.tokens_per_step = Histogram("onspec_request_tokens_per_step", "generated tokens per target forward "
                                         "pass of one request", ["drafter_version"], registry=r,
                                         buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8))
        self.source_rounds = Counter("onspec_draft_source_rounds", "verification rounds by draft source (model: "
                                     "the drafter; suffix: text seen before; none: no draft)", ["source"],
                                     registry=r)
        self.source_drafted = Counter("onspec_draft_source_drafted_tokens", "drafted tokens by draft source",
                                      ["source"], registry=r)
        self.source_accepted = Counter("onspec_draft_source_accepted_tokens", "accepted tokens by draft source",
                                       ["source"], registry=r)
        self.draft_length = Histogram("onspec_request_draft_length", "mean draft length chosen per verification "
                                      "round of one request (0: the controller did not draft)",
                                      ["drafter_version"], registry=r,
                                      buckets=(0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16))

    def label(self, label: str | None) -> str:
        return _bounded(label, self._labels, MAX_METRIC_LABELS) if label else ""

    def version(self, version: str | None) -> str:
        return _bounded(version, self._versions, MAX_METRIC_VERSIONS) if version else "none"

    def finished(self, label: str | None, usage: dict, replica: dict | None) -> tuple[str, str]:
        """Count a finished request; returns the (drafter_version, label) series it went to."""
        lab, ver = self.label(label), self.version(usage.get("drafter_version"))
        self.prompt_tokens.labels(lab).inc(usage["prompt_tokens"])
        self.completion_tokens.labels(lab).inc(usage["completion_tokens"])
        self.drafted.labels(lab).inc(usage["drafted_tokens"])
        self.accepted.labels(lab).inc(usage["accepted_tokens"])
        steps = verification_steps(usage)
        self.served.labels(ver, lab).inc()
        self.generated.labels(ver, lab).inc(usage["completion_tokens"])
        self.drafted_by.labels(ver, lab).inc(usage["drafted_tokens"])
        self.accepted_by.labels(ver, lab).inc(usage["accepted_tokens"])
        self.steps.labels(ver, lab).inc(steps)
        for source, figures in (usage.get("draft_sources") or {}).items():
            if source in ("model", "suffix", "none"):
                self.source_rounds.labels(source).inc(figures["rounds"])
                self.source_drafted.labels(source).inc(figures["drafted"])
                self.source_accepted.labels(source).inc(figures["accepted"])
        if usage["drafted_tokens"]:
            self.acceptance.labels(ver).observe(usage["accepted_tokens"] / usage["drafted_tokens"])
        if steps:
            self.tokens_per_step.labels(ver).observe(usage["completion_tokens"] / steps)
        if steps > 1:  # the rounds after prefill each chose a draft length
            self.draft_length.labels(ver).observe(usage["drafted_tokens"] / (steps - 1))
        if replica:
            self.replica(replica)
        return ver, lab

    def replica(self, rep: dict) -> None:
        self.replicas[rep["replica_id"]] = rep
        self.seen[rep["replica_id"]] = time.time()

    def live_replicas(self) -> list[dict]:
        cutoff = time.time() - REPLICA_STALE_S
        return [rep for rid, rep in sorted(self.replicas.items()) if self.seen.get(rid, 0) >= cutoff]

    def collect(self):
        yield from self._logger_families()
        yield from self._replica_families()
        yield from _trainer_families(self.trainer)
        yield from _registry_families(self.drafters)

    def _logger_families(self):
        written = CounterMetricFamily("onspec_stream_records_written", "records Redis acknowledged",
                                      labels=["replica"])
        dropped = CounterMetricFamily("onspec_stream_records_dropped", "records dropped (buffer full)",
                                      labels=["replica"])
        errors = CounterMetricFamily("onspec_stream_write_errors", "failed stream writes", labels=["replica"])
        pending = GaugeMetricFamily("onspec_stream_records_pending", "records waiting for Redis",
                                    labels=["replica"])
        gen = CounterMetricFamily("onspec_engine_generate_seconds", "time spent generating", labels=["replica"])
        cpu = CounterMetricFamily("onspec_stream_logger_cpu_seconds", "CPU time of the stream writer thread",
                                  labels=["replica"])
        obs = CounterMetricFamily("onspec_stream_observer_seconds", "part of it spent handing records to the "
                                  "logger (the logging cost on the request path)", labels=["replica"])
        for rid, rep in self.replicas.items():
            gen.add_metric([rid], rep.get("generate_s", 0.0))
            obs.add_metric([rid], rep.get("observer_s", 0.0))
            log = rep.get("logger")
            if log:
                written.add_metric([rid], log["written"])
                dropped.add_metric([rid], log["dropped"])
                errors.add_metric([rid], log["errors"])
                pending.add_metric([rid], log["pending"])
                cpu.add_metric([rid], log.get("cpu_s", 0.0))
        yield from (written, dropped, errors, pending, gen, obs, cpu)

    def _replica_families(self):
        info = GaugeMetricFamily("onspec_replica_drafter_info", "1 for the drafter version each engine replica "
                                 "serves (as it last reported)", labels=["replica", "drafter_version"])
        busy = GaugeMetricFamily("onspec_replica_in_flight", "requests running or waiting on each engine replica "
                                 "(as it last reported)", labels=["replica"])
        swaps = CounterMetricFamily("onspec_replica_drafter_swaps", "drafter hot swaps each engine replica took",
                                    labels=["replica"])
        for rep in self.live_replicas():
            rid = rep["replica_id"]
            info.add_metric([rid, str(rep.get("drafter_version") or "none")], 1.0)
            busy.add_metric([rid], rep.get("in_flight", 0))
            swaps.add_metric([rid], rep.get("drafter_swaps", 0))
        yield from (info, busy, swaps)


def _trainer_families(state: dict | None):
    up = GaugeMetricFamily("onspec_trainer_up", "1 when the online trainer answered at this scrape")
    up.add_metric([], 1.0 if state else 0.0)
    yield up
    if not state:
        return
    counters = (("steps", "onspec_trainer_steps", "training steps"),
                ("records_read", "onspec_trainer_records_read", "stream records read"),
                ("records_acked", "onspec_trainer_records_consumed",
                 "stream records trained on (or held back for the gate) and acknowledged"),
                ("records_skipped", "onspec_trainer_records_skipped", "records skipped (unknown schema, trimmed)"),
                ("records_malformed", "onspec_trainer_records_malformed",
                 "malformed records skipped (undecodable or out-of-range fields)"),
                ("busy_waits", "onspec_trainer_paused_for_load", "times the trainer paused for serving load"),
                ("candidates", "onspec_trainer_candidates", "candidate versions registered"),
                ("train_s", "onspec_trainer_train_seconds", "time spent in training steps"),
                ("tokens_supervised", "onspec_trainer_tokens_supervised",
                 "positions trained on (every position of each window, replays included)"))
    for key, name, doc in counters:
        yield CounterMetricFamily(name, doc, value=float(state.get(key) or 0))
    gate = CounterMetricFamily("onspec_trainer_gate_decisions", "promotion gate decisions on candidates",
                               labels=["decision"])
    gate.add_metric(["promoted"], len(state.get("promoted") or ()))
    gate.add_metric(["rejected"], len(state.get("rejected") or ()))
    yield gate
    if state.get("last_loss") is not None:
        yield GaugeMetricFamily("onspec_trainer_loss", "loss of the last training step", value=state["last_loss"])
    yield GaugeMetricFamily("onspec_trainer_paused", "1 while an operator has paused the trainer",
                            value=1.0 if state.get("paused") else 0.0)
    yield GaugeMetricFamily("onspec_trainer_replay_windows", "windows in the replay buffer",
                            value=float(state.get("replay") or 0))
    if state.get("record_wait_p50_s") is not None:
        yield GaugeMetricFamily("onspec_trainer_record_wait_seconds", "median time a record waited in the stream "
                                "before a training step used it (last 256 records)", value=state["record_wait_p50_s"])


def _registry_families(drafters: dict | None):
    if drafters is None:  # no Redis, or it did not answer: better no series than wrong ones
        return
    serving = GaugeMetricFamily("onspec_drafter_serving_info", "1 for the drafter version the registry says "
                                "every replica should serve", labels=["drafter_version"])
    if drafters["serving"]:
        serving.add_metric([drafters["serving"]], 1.0)
    yield serving
    history = drafters["history"]
    yield CounterMetricFamily("onspec_drafter_promotions", "promotions in the registry's history (by the "
                              "trainer's gate or an operator)",
                              value=sum(h.get("action") == "promote" for h in history))
    yield CounterMetricFamily("onspec_drafter_rollbacks", "rollbacks in the registry's history",
                              value=sum(h.get("action") == "rollback" for h in history))
    if history:
        yield GaugeMetricFamily("onspec_drafter_last_change_timestamp_seconds", "when the serving version last "
                                "changed (Unix time)", value=float(history[-1].get("at") or 0))


# ---- the app ------------------------------------------------------------------------------------------------
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


def onspec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("onspec")
    except PackageNotFoundError:  # run from a checkout without an install
        return "unknown"


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


def _history(cfg: OnspecConfig, registry) -> History:
    """The dashboard's history store: the given registry's Redis, else ``redis.url``, else memory."""
    if registry is not None:
        return History(lambda: registry.r)
    if cfg.redis.url:
        def client():
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One quick retry (a dropped idle connection), not redis-py's seconds of backoff: the page polls,
            # the flusher tries again at its next interval.
            return redis.Redis.from_url(cfg.redis.url, socket_timeout=SNAPSHOT_TIMEOUT_S,
                                        socket_connect_timeout=SNAPSHOT_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        return History(client)
    return History()


def create_app(cfg: OnspecConfig, backend, registry=None, history: History | None = None) -> FastAPI:
    """``registry``: a DrafterRegistry for the admin endpoints; None builds one from ``cfg.redis.url`` on
    first use (none without a Redis URL: the admin endpoints then answer 503). ``history``: the dashboard's
    store (cluster/dashboard.py); None puts it in the registry's Redis (or memory without Redis)."""
    history = history or _history(cfg, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        flusher = asyncio.create_task(history.run(getattr(backend, "trainer", None)))
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(BaseException):
                await flusher
            with contextlib.suppress(Exception):  # what the last interval summed (Redis may be gone by now)
                await asyncio.wait_for(history.flush(), SNAPSHOT_TIMEOUT_S)

    app = FastAPI(title="onspec", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    model_name = cfg.server.served_model_name or cfg.model.name
    metrics = Metrics()
    drafters = _Registry(cfg, registry)
    app.state.metrics, app.state.history = metrics, history
    keys = Keys(*cfg.server.keys())  # the key files are read here, in the process that serves
    limiter = app.state.limiter = Limiter(cfg.server.max_concurrent_per_key)
    app.state.auth = keys.enabled

    def refused(path: str, status: int) -> None:
        if path in ENDPOINTS:
            metrics.requests.labels(ENDPOINTS[path], str(status)).inc()

    app.add_middleware(AuthMiddleware, keys=keys, limiter=limiter, refused=refused)
    app.openapi = lambda: app.openapi_schema or _openapi(app, keys.enabled, model_name, cfg.server.max_tokens_limit)

    def record(label: str | None, usage: dict, replica: dict | None, t0: float) -> None:
        version, lab = metrics.finished(label, usage, replica)
        history.add(version, lab, usage, verification_steps(usage), time.perf_counter() - t0)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint:  # the request metrics count the two generation endpoints only
            metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": {"message": str(e.detail), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameter(request: Request, e: RequestValidationError):
        # A query or path parameter FastAPI checks itself: a 400 in OpenAI's shape (vLLM's choice), not a 422.
        err = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_response(400, {"message": f"{param}: {err.get('msg', 'invalid')}" if param else
                                    str(err.get("msg", "invalid request")), "type": "invalid_request_error",
                                    "param": param, "code": "invalid_value"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(500, {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                    "param": None, "code": None})

    async def parse(request: Request, schema: type[_Request]) -> _Request:
        req = validated(schema, await read_json(request, cfg.server.max_body_bytes))
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found", type="not_found_error")
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

    def sampling(req: _Request, max_tokens: int | None, default_max: int) -> dict:
        param = "max_completion_tokens" if isinstance(req, ChatCompletionRequest) and \
            req.max_completion_tokens is not None else "max_tokens"
        n = default_max if max_tokens is None else max_tokens
        if n < 1:
            raise APIError(400, f"{param} must be at least 1, got {n}", param=param, code="invalid_value")
        if n > cfg.server.max_tokens_limit:
            raise APIError(400, f"{param} must be at most {cfg.server.max_tokens_limit}, got {n}", param=param,
                           code="invalid_value")
        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        return {"max_tokens": n, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                "seed": req.seed, "label": req.label, "request_id": uuid.uuid4().hex, "stop": req.stop,
                "logprobs": logprobs}

    def unavailable(e: Exception) -> APIError:
        if type(e).__name__ == "BackPressureError":  # Ray Serve's queue for the replicas is full
            return APIError(429, "every replica is busy and the queue is full; retry shortly", type="rate_limit_error",
                            code="overloaded")
        return APIError(503, f"no replica could serve the request: {type(e).__name__}", type="server_error",
                        code="unavailable")

    def choices(req: _Request, payload: dict) -> list[dict]:
        """One backend request per choice: its own request id and, when seeded, its own seed."""
        return [{**payload, "request_id": uuid.uuid4().hex if i else payload["request_id"],
                 "seed": None if req.seed is None else (req.seed + i) % 2**64} for i in range(req.n)]

    async def complete_once(payload: dict) -> dict:
        """A replica that dies takes nothing the client saw: retry once on another one."""
        for attempt in (0, 1):
            try:
                return await backend.complete(payload)
            except Exception as e:  # noqa: BLE001 -- the replica is gone or overloaded
                if attempt or type(e).__name__ == "BackPressureError":
                    raise unavailable(e) from None
                payload = {**payload, "request_id": uuid.uuid4().hex}
                metrics.retried.inc()

    async def events_once(payload: dict):
        """The backend's event stream, surviving one replica failure: before any token the request is sent again;
        after some, it goes on from them on another replica (the prompt and the tokens streamed so far become the
        new prompt: the continuation is what the target would have sampled next, and greedy or seeded requests
        give the very same tokens)."""
        prompt_ids, out, sent = None, [], ""
        for attempt in (0, 1):
            events = backend.stream(payload)
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
                metrics.retried.inc()
            finally:
                await events.aclose()

    def refusal(status: int, error: dict) -> JSONResponse:
        return JSONResponse({"error": error}, status_code=status,
                            headers={"Retry-After": "1"} if status == 429 else None)

    async def call(endpoint: str, req: _Request, payload: dict, render) -> Any:
        t0 = time.perf_counter()
        if req.stream:
            return await stream(endpoint, req, choices(req, payload), render, t0)
        results = await asyncio.gather(*(complete_once(p) for p in choices(req, payload)))
        for res in results:
            if res["type"] == "error":
                metrics.requests.labels(endpoint, str(res["status"])).inc()
                return refusal(res["status"], res["error"])
        for res in results:
            record(req.label, res["usage"], res.get("replica"), t0)
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return render.full(results, merge_usage([r["usage"] for r in results]))

    async def stream(endpoint: str, req: _Request, payloads: list[dict], render, t0: float):
        gens = [events_once(p) for p in payloads]

        async def first_of(gen):
            return await gen.__anext__()

        try:
            firsts = await asyncio.gather(*(first_of(g) for g in gens))
        except Exception as e:  # noqa: BLE001 -- any failure to start a stream is a 503 (or 429)
            for g in gens:
                await g.aclose()
            raise unavailable(e) from None
        for first in firsts:
            if first["type"] == "error":
                for g in gens:
                    await g.aclose()
                metrics.requests.labels(endpoint, str(first["status"])).inc()
                return refusal(first["status"], first["error"])
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
                    elif ev["type"] == "delta":
                        if first_token:
                            metrics.ttft.observe(time.perf_counter() - t0)
                            first_token = False
                        if ev["text"] or ev.get("logprobs"):
                            yield sse(render.delta(ev["text"], i, ev.get("logprobs")))
                    elif ev["type"] == "end":
                        ended.add(i)
                        usages.append(ev["usage"])
                        record(req.label, ev["usage"], ev.get("replica"), t0)
                        yield sse(render.finish(ev["finish_reason"], i))
                    elif ev["type"] == "error":
                        failed = True
                        yield sse({"error": ev["error"]})
                if len(ended) < len(gens) and not failed:
                    yield sse({"error": {"message": "generation ended early", "type": "server_error",
                                         "param": None, "code": None}})
                if include_usage and usages:
                    yield sse(render.usage(merge_usage(usages)))
                yield "data: [DONE]\n\n"
                metrics.requests.labels(endpoint, "200").inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            finally:
                if len(ended) < len(gens):
                    metrics.cancelled.inc()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # Closing the backend streams cancels the generations on the replicas (client disconnects too).
                for g in gens:
                    await g.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- endpoints ----------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be a string or a list of exactly one string", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        payload = {"prompt": prompt, **sampling(req, req.max_tokens, 16)}
        return await call("completions", req, payload, _CompletionRender(model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in req.messages]
        if not any((m["content"] or "").strip() for m in messages):
            raise APIError(400, "the messages are empty", param="messages", code="empty_prompt")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        payload = {"messages": [{**m, "content": m["content"] or ""} for m in messages],
                   **sampling(req, limit, 256)}
        return await call("chat_completions", req, payload, _ChatRender(model_name))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "onspec", "max_model_len": cfg.model.max_context}]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/health")
    async def health():
        """vLLM's probe (benchmark tools call it first): 200 while an engine replica answers, else 503."""
        try:
            await asyncio.wait_for(backend.ready(), 10.0)
        except Exception as e:  # noqa: BLE001 -- any failure means not serving
            return JSONResponse({"status": "unavailable", "reason": f"no engine replica answered within 10 s: "
                                                                   f"{type(e).__name__}"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": onspec_version()}

    @app.get("/readyz")
    async def readyz():
        try:
            state = await asyncio.wait_for(backend.ready(), 10.0)
        except Exception as e:  # noqa: BLE001 -- any failure means not ready
            return JSONResponse({"status": "unavailable", "reason": f"no engine replica answered within 10 s: "
                                                                   f"{type(e).__name__}"}, status_code=503)
        # Redis down is degraded, not unready: serving goes on and the records wait in the buffer.
        status = "ok" if state["redis"] in ("ok", "disabled") else "degraded"
        return {"status": status, **state}

    async def refresh_replica() -> None:
        try:  # a fresh snapshot of one replica (the others update as their requests finish)
            metrics.replica(await asyncio.wait_for(backend.stats(), SNAPSHOT_TIMEOUT_S))
        except Exception:  # noqa: BLE001, S110
            pass  # busy or gone: the last reported figures stand

    async def refresh_trainer() -> None:
        fetch = getattr(backend, "trainer", None)
        try:
            metrics.trainer = await asyncio.wait_for(fetch(), SNAPSHOT_TIMEOUT_S) if fetch else None
        except Exception:  # noqa: BLE001 -- a trainer that does not answer is reported as down
            metrics.trainer = None

    async def refresh_drafters() -> str | None:
        """The registry's serving version and history; returns why not, when Redis cannot say."""
        def read():
            reg = drafters.get()
            return {"serving": reg.serving(), "history": reg.history()}
        try:
            metrics.drafters = await asyncio.wait_for(asyncio.to_thread(read), SNAPSHOT_TIMEOUT_S)
            return None
        except Exception as e:  # noqa: BLE001 -- no Redis, or it is down: no registry series this time
            metrics.drafters = None
            return e.body["error"]["message"] if isinstance(e, APIError) else f"{type(e).__name__}: {e}"

    async def refresh() -> str | None:
        _, _, why = await asyncio.gather(refresh_replica(), refresh_trainer(), refresh_drafters())
        return why

    @app.get("/metrics")
    async def prometheus():
        await refresh()
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def snapshot() -> dict:
        why = await refresh()
        d = metrics.drafters or {"serving": None, "history": []}
        replicas = [{k: rep.get(k) for k in ("replica_id", "drafter_version", "in_flight", "drafter_swaps")}
                    | {"seen": metrics.seen.get(rep["replica_id"])} for rep in metrics.live_replicas()]
        return {"serving": d["serving"], "events": d["history"], "replicas": replicas,
                "errors": [f"drafter registry: {why}"] if why else []}

    add_admin_routes(app, cfg, drafters, backend)
    add_dashboard_routes(app, history, snapshot)
    return app


# ---- admin: the drafter registry ----------------------------------------------------------------------------
class _Registry:
    """The DrafterRegistry, built on first use: the app may be built in one process and serve in another (Ray
    Serve), and importing the registry pulls in torch, which the ingress otherwise never needs."""

    def __init__(self, cfg: OnspecConfig, registry):
        self.cfg, self.registry = cfg, registry

    def get(self):
        if self.registry is None:
            if not self.cfg.redis.url:
                raise APIError(503, "the drafter registry needs Redis, and this server runs without it "
                                    "(no redis.url)", type="server_error", code="registry_unavailable")
            from onspec.actors.registry import DrafterRegistry
            try:
                self.registry = DrafterRegistry.from_url(self.cfg.redis.url, self.cfg.data_dir,
                                                         self.cfg.registry.prefix)
            except ValueError as e:  # a malformed URL: the server's configuration, not the request
                raise APIError(503, f"the drafter registry cannot use redis.url: {e}", type="server_error",
                               code="registry_unavailable") from None
        return self.registry


def _check_version(version: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, version):
        raise APIError(400, f"invalid drafter version {version[:80]!r}: expected {VERSION_PATTERN}",
                       param="version", code="invalid_value")
    return version


def _known(reg, version: str) -> dict:
    """show(version), or a 404 for a version the registry does not know."""
    from onspec.actors.registry import RegistryError

    try:
        return reg.show(version)
    except RegistryError as e:
        raise APIError(404, str(e), param="version", code="drafter_not_found", type="not_found_error") from None


def add_admin_routes(app: FastAPI, cfg: OnspecConfig, registry=None, backend=None) -> None:
    """``registry``: a DrafterRegistry, a _Registry (shared with the metrics), or None (built from the config)."""
    handle = registry if isinstance(registry, _Registry) else _Registry(cfg, registry)

    async def call(fn):
        """fn(registry) on a worker thread (redis-py blocks). A refused operation is a 409, an unreachable Redis
        a 503; neither a stack trace."""
        import redis
        from onspec.actors.registry import RegistryError

        reg = handle.get()
        try:
            return await asyncio.to_thread(fn, reg)
        except RegistryError as e:
            raise APIError(409, str(e), code="conflict") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise APIError(503, f"the drafter registry cannot reach Redis: {type(e).__name__}: {e}",
                           type="server_error", code="registry_unavailable") from None
        except redis.RedisError as e:
            raise APIError(503, f"the drafter registry's Redis failed: {type(e).__name__}: {e}",
                           type="server_error", code="registry_unavailable") from None

    async def body(request: Request, schema: type[BaseModel]) -> BaseModel:
        return validated(schema, await read_json(request, cfg.server.max_body_bytes, empty={}))

    @app.get("/v1/admin/trainer")
    async def trainer_state():
        """The online trainer's state (steps, records, candidates, the last gate evaluation), if one runs."""
        fetch = getattr(backend, "trainer", None)
        state = await fetch() if fetch is not None else None
        if state is None:
            raise APIError(503, "no online trainer is running (trainer.enabled is false, or the stream is off)",
                           type="server_error", code="trainer_unavailable")
        return state

    @app.get("/v1/admin/drafters")
    async def list_drafters():
        def listing(reg):
            drafters = [{k: v for k, v in d.items() if k != "manifest"} for d in reg.list()]
            return {"serving": reg.serving(), "drafters": drafters}
        return await call(listing)

    @app.get("/v1/admin/drafters/{version}")
    async def show_drafter(version: str):
        _check_version(version)
        return await call(lambda reg: _known(reg, version))

    @app.post("/v1/admin/drafters/rollback")
    async def rollback(request: Request):
        req = await body(request, RollbackBody)

        def roll(reg):
            if req.version is not None:
                _known(reg, req.version)
            return reg.rollback(req.version, req.reason)
        return await call(roll)

    @app.post("/v1/admin/drafters/{version}/promote")
    async def promote(version: str, request: Request):
        _check_version(version)
        req = await body(request, PromoteBody)

        def switch(reg):
            _known(reg, version)
            return reg.promote(version, **({"reason": req.reason} if req.reason else {}))
        return await call(switch)


# ---- the OpenAPI schema -----------------------------------------------------------------------------------------
# The generation and admin routes parse their bodies themselves (read_json + validated: 413 before parsing, 400s in
# OpenAI's shape), so FastAPI cannot see them: _openapi declares every route's body, answers and refusals from
# the table below, and the 401/403/429 of AuthMiddleware from required_scope, the same rule it applies.
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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
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


def _openapi(app: FastAPI, auth: bool, model_name: str, max_tokens_limit: int) -> dict:
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
            "top_logprobs": [dict(top) for _, _, top in items], "text_offset": offsets}


def chat_logprobs(items: list | None) -> dict | None:
    """/v1/chat/completions' logprobs object (content: one entry per token, with its alternatives)."""
    if items is None:
        return None

    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in items]}


class _CompletionRender:
    object = "text_completion"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offsets: dict[int, int] = {}  # per choice: characters streamed (logprobs' text_offset)

    def _base(self, **kw) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, **kw}

    def full(self, results: list[dict], usage: dict) -> dict:
        return self._base(choices=[{"index": i, "text": r["text"], "logprobs": completion_logprobs(r.get("logprobs")),
                                    "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                          usage=usage)

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


class _ChatRender(_CompletionRender):
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
