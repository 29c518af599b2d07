"""The admin API (/v1/admin/...: the drafter registry and the trainer's state) and the data the dashboard and
/metrics read at each request: a fresh snapshot of a replica, the trainer and the registry."""
from __future__ import annotations

import asyncio
import re

from fastapi import FastAPI, Request
from pydantic import BaseModel

from onspec.actors.config import OnspecConfig
from onspec.cluster.api.errors import APIError
from onspec.cluster.api.metrics import SNAPSHOT_TIMEOUT_S, Metrics
from onspec.cluster.api.protocol import VERSION_PATTERN, PromoteBody, RollbackBody, read_json, validated
from onspec.cluster.dashboard import History

def history_store(cfg: OnspecConfig, registry) -> History:
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


class DrafterAccess:
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
    """``registry``: a DrafterRegistry, a DrafterAccess (shared with the snapshots), or None (built from the config)."""
    handle = registry if isinstance(registry, DrafterAccess) else DrafterAccess(cfg, registry)

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


class Snapshots:
    """What /metrics and the dashboard read at each request, fetched fresh into ``metrics``: one replica's
    stats (the others update as their requests finish), the trainer's state, the registry's serving version and
    history. Each waits at most SNAPSHOT_TIMEOUT_S; what does not answer is reported as missing, not waited for."""

    def __init__(self, metrics: Metrics, backend, drafters: DrafterAccess):
        self.metrics, self.backend, self.drafters = metrics, backend, drafters

    async def _replica(self) -> None:
        try:
            self.metrics.replica(await asyncio.wait_for(self.backend.stats(), SNAPSHOT_TIMEOUT_S))
        except Exception:  # noqa: BLE001, S110
            pass  # busy or gone: the last reported figures stand

    async def _trainer(self) -> None:
        fetch = getattr(self.backend, "trainer", None)
        try:
            self.metrics.trainer = await asyncio.wait_for(fetch(), SNAPSHOT_TIMEOUT_S) if fetch else None
        except Exception:  # noqa: BLE001 -- a trainer that does not answer is reported as down
            self.metrics.trainer = None

    async def _drafters(self) -> str | None:
        """The registry's serving version and history; returns why not, when Redis cannot say."""
        def read():
            reg = self.drafters.get()
            return {"serving": reg.serving(), "history": reg.history()}
        try:
            self.metrics.drafters = await asyncio.wait_for(asyncio.to_thread(read), SNAPSHOT_TIMEOUT_S)
            return None
        except Exception as e:  # noqa: BLE001 -- no Redis, or it is down: no registry series this time
            self.metrics.drafters = None
            return e.body["error"]["message"] if isinstance(e, APIError) else f"{type(e).__name__}: {e}"

    async def refresh(self) -> str | None:
        """Fetch all three; returns why the registry could not be read, if it could not."""
        _, _, why = await asyncio.gather(self._replica(), self._trainer(), self._drafters())
        return why

    async def dashboard(self) -> dict:
        """The dashboard's live part: the serving version, the registry's events, the live replicas."""
        why = await self.refresh()
        m = self.metrics
        d = m.drafters or {"serving": None, "history": []}
        replicas = [{k: rep.get(k) for k in ("replica_id", "drafter_version", "in_flight", "drafter_swaps")}
                    | {"seen": m.seen.get(rep["replica_id"])} for rep in m.live_replicas()]
        return {"serving": d["serving"], "events": d["history"], "replicas": replicas,
                "errors": [f"drafter registry: {why}"] if why else []}
