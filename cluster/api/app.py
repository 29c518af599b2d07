"""The app: ``create_app`` wires the parts of the OpenAI-compatible HTTP API (FastAPI), independent of Ray. It
talks to a *backend* with these methods:

    async complete(request: dict) -> dict         a replica result or an error event (actors/replica.py)
    stream(request: dict) -> AsyncIterator[dict]  replica events; closing it early must stop generation
    async ready() -> dict                         Replica.ready()
    async stats() -> dict                         Replica.stats()
    async tokenize(req) / detokenize(req) -> dict Replica.tokenize / detokenize: a result or an error event

and optionally ``async trainer() -> dict | None`` (the online trainer's state).
cluster/serve.py passes a backend over Ray Serve deployment handles; tests may pass a local one.
Every refusal is a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}.
The same app serves the drafter registry's admin endpoints (/v1/admin/drafters...) when Redis is configured,
/metrics (Prometheus) and the dashboard (/dashboard, cluster/dashboard.py).

With keys configured (server.api_keys / admin_keys / the key files), every route but /healthz, /health, /readyz,
/version, /metrics and the dashboard's page and static files needs ``Authorization: Bearer <key>``; /v1/admin/*
needs an admin key (docs/security.md). ``create_app(...).openapi()`` is the API's OpenAPI schema, request bodies
and refusals included (tests/test_fuzz.py fuzzes the app from it).
"""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from onspec.actors.config import OnspecConfig
from onspec.cluster.api.admin import DrafterAccess, Snapshots, add_admin_routes, history_store
from onspec.cluster.api.auth import AuthMiddleware, Keys, Limiter
from onspec.cluster.api.errors import add_error_handlers
from onspec.cluster.api.metrics import SNAPSHOT_TIMEOUT_S, Metrics
from onspec.cluster.api.openapi import openapi_schema
from onspec.cluster.api.protocol import ENDPOINTS
from onspec.cluster.api.serving import OpenAIServing
from onspec.cluster.dashboard import History, add_dashboard_routes


def onspec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("onspec")
    except PackageNotFoundError:  # run from a checkout without an install
        return "unknown"


def create_app(cfg: OnspecConfig, backend, registry=None, history: History | None = None) -> FastAPI:
    """``registry``: a DrafterRegistry for the admin endpoints; None builds one from ``cfg.redis.url`` on
    first use (none without a Redis URL: the admin endpoints then answer 503). ``history``: the dashboard's
    store (cluster/dashboard.py); None puts it in the registry's Redis (or memory without Redis)."""
    history = history or history_store(cfg, registry)

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
    metrics = Metrics()
    drafters = DrafterAccess(cfg, registry)
    serving = OpenAIServing(cfg, backend, metrics, history)
    snapshots = Snapshots(metrics, backend, drafters)
    app.state.metrics, app.state.history = metrics, history
    keys = Keys(*cfg.server.keys())  # the key files are read here, in the process that serves
    limiter = app.state.limiter = Limiter(cfg.server.max_concurrent_per_key)
    app.state.auth = keys.enabled

    def counted(path: str, status: int) -> None:  # the request metrics count the two generation endpoints only
        if path in ENDPOINTS:
            metrics.requests.labels(ENDPOINTS[path], str(status)).inc()

    app.add_middleware(AuthMiddleware, keys=keys, limiter=limiter, refused=counted)
    app.openapi = lambda: app.openapi_schema or openapi_schema(app, keys.enabled, serving.model_name,
                                                               cfg.server.max_tokens_limit)
    add_error_handlers(app, counted)
    app.post("/v1/completions")(serving.completions)
    app.post("/v1/chat/completions")(serving.chat_completions)
    app.post("/tokenize")(serving.tokenize)
    app.post("/detokenize")(serving.detokenize)
    add_health_routes(app, cfg, backend, serving.model_name)

    @app.get("/metrics")
    async def prometheus():
        await snapshots.refresh()
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    add_admin_routes(app, cfg, drafters, backend)
    add_dashboard_routes(app, history, snapshots.dashboard)
    return app


def add_health_routes(app: FastAPI, cfg: OnspecConfig, backend, model_name: str) -> None:
    """/v1/models and the probes: /healthz (the process), /health (vLLM's: an engine replica answers), /readyz
    (Kubernetes': ready, with the replica's state), /version."""

    async def replica_state() -> dict | JSONResponse:
        try:
            return await asyncio.wait_for(backend.ready(), 10.0)
        except Exception as e:  # noqa: BLE001 -- any failure means not serving
            return JSONResponse({"status": "unavailable", "reason": f"no engine replica answered within 10 s: "
                                                                   f"{type(e).__name__}"}, status_code=503)

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
        state = await replica_state()
        return state if isinstance(state, JSONResponse) else {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": onspec_version()}

    @app.get("/readyz")
    async def readyz():
        state = await replica_state()
        if isinstance(state, JSONResponse):
            return state
        # Redis down is degraded, not unready: serving goes on and the records wait in the buffer.
        status = "ok" if state["redis"] in ("ok", "disabled") else "degraded"
        return {"status": status, **state}
