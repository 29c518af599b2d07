"""The built-in dashboard: ``GET /dashboard``, a page of plain SVG and vanilla JS shipped in ``cluster/static``
(nothing is fetched from the internet), and ``GET /dashboard/data``, the JSON it draws from.

History. The ingress sums what every finished request reports (requests, generated tokens, drafted and accepted
tokens, target forward passes, latency) per (drafter version, traffic label). Every ``interval_s`` it appends one
entry per pair that saw traffic to a Redis stream (``XADD key MAXLEN ~ maxlen``), plus one entry with the
trainer's figures when a trainer runs. Entries are aggregates, not requests, so the stream's size depends on
time, not on load: at the defaults (10 s, 50,000 entries) it holds about a day of a few active pairs. The page
asks for a time window; the answer is that window's entries read back from Redis (so a reload, or a restarted
ingress, shows the past) plus the sums not yet written, marked ``live``. Without Redis the entries go to a
bounded in-memory deque instead: the same page, but the past ends with the process.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from importlib import resources

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

HISTORY_KEY = "onspec:dashboard:history"
HISTORY_INTERVAL_S = 10.0
HISTORY_MAXLEN = 50_000
HISTORY_READ_LIMIT = 20_000  # entries one answer may carry (the newest of the window)
WINDOW_MAX_S = 7 * 86400.0
MEMORY_ENTRIES = 5_000
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
SUMS = ("requests", "tokens", "drafted", "accepted", "steps", "latency_s",
        # by draft source (actors/engine.py): the drafter model's figures are what drift by version means
        "model_drafted", "model_accepted", "suffix_drafted", "suffix_accepted")
TRAINER_FIELDS = (("steps", "steps"), ("consumed", "records_acked"), ("paused_for_load", "busy_waits"),
                  ("tokens_supervised", "tokens_supervised"))
log = logging.getLogger("onspec.dashboard")


class History:
    """Per-(version, label) sums of finished requests, written out every ``interval_s`` (module docstring).

    ``client`` is a callable returning a redis-py client, or None for the in-memory store; it is called on
    first use, so the app can be built before Redis is reachable."""

    def __init__(self, client=None, key: str = HISTORY_KEY, interval_s: float = HISTORY_INTERVAL_S,
                 maxlen: int = HISTORY_MAXLEN):
        self._client_fn, self._client = client, None
        self.key, self.interval_s, self.maxlen = key, interval_s, maxlen
        self.pending: dict[tuple[str, str], dict] = {}
        self.since = time.time()
        self.memory: collections.deque[dict] = collections.deque(maxlen=MEMORY_ENTRIES)
        self.last_error: str | None = None

    @property
    def store(self) -> str:
        return "redis" if self._client_fn is not None else "memory"

    def client(self):
        if self._client is None and self._client_fn is not None:
            self._client = self._client_fn()
        return self._client

    # ---- collecting ------------------------------------------------------------------------------------------
    def add(self, version: str, label: str, usage: dict, steps: int, latency_s: float) -> None:
        agg = self.pending.setdefault((version, label), dict.fromkeys(SUMS, 0))
        agg["requests"] += 1
        agg["tokens"] += usage["completion_tokens"]
        agg["drafted"] += usage["drafted_tokens"]
        agg["accepted"] += usage["accepted_tokens"]
        agg["steps"] += steps
        agg["latency_s"] += latency_s
        for source, figures in (usage.get("draft_sources") or {}).items():
            if source in ("model", "suffix"):
                agg[f"{source}_drafted"] += figures["drafted"]
                agg[f"{source}_accepted"] += figures["accepted"]

    def _points(self, now: float) -> list[dict]:
        dt = max(now - self.since, 1e-3)
        return [{"kind": "traffic", "t": now, "dt": dt, "version": v, "label": lab, **agg}
                for (v, lab), agg in self.pending.items()]

    def live(self) -> list[dict]:
        """The sums not yet written, as points ending now."""
        return [{**p, "live": True} for p in self._points(time.time())]

    def take(self) -> tuple[float, list[dict]]:
        now = time.time()
        since, points = self.since, self._points(now)
        self.pending, self.since = {}, now
        return since, points

    def give_back(self, since: float, points: list[dict]) -> None:
        """A write failed: the sums rejoin the pending ones (the next entry spans both intervals)."""
        for p in points:
            agg = self.pending.setdefault((p["version"], p["label"]), dict.fromkeys(SUMS, 0))
            for k in SUMS:
                agg[k] += p[k]
        self.since = min(self.since, since)

    # ---- storing (blocking: called on a worker thread) ---------------------------------------------------------
    def write(self, entries: list[dict]) -> None:
        client = self.client()
        if client is None:
            self.memory.extend(entries)
            return
        with client.pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.xadd(self.key, {k: _field(v) for k, v in e.items()}, maxlen=self.maxlen, approximate=True)
            pipe.execute()

    def read(self, since: float) -> list[dict]:
        client = self.client()
        if client is None:
            return [e for e in self.memory if e["t"] > since]
        raw = client.xrevrange(self.key, max="+", min=str(int(since * 1000)), count=HISTORY_READ_LIMIT)
        return [_decode(fields) for _, fields in reversed(raw)]

    # ---- the flusher -----------------------------------------------------------------------------------------
    async def flush(self, trainer_state: dict | None = None) -> None:
        since, points = self.take()
        entries = list(points)
        if trainer_state:
            entries.append(trainer_entry(trainer_state, time.time()))
        if not entries:
            return
        try:
            await asyncio.to_thread(self.write, entries)
            self.last_error = None
        except Exception as e:  # noqa: BLE001 -- Redis down: keep the sums for the next try, never fail serving
            self.give_back(since, points)
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("dashboard history not written: %s", self.last_error)

    async def run(self, trainer=None) -> None:
        """Flush every ``interval_s`` until cancelled; ``trainer`` is an async callable for its state."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush(await _safe(trainer))


async def _safe(fetch, timeout_s: float = 5.0):
    if fetch is None:
        return None
    try:
        return await asyncio.wait_for(fetch(), timeout_s)
    except Exception:  # noqa: BLE001 -- no answer is no snapshot
        return None


def trainer_entry(state: dict, t: float) -> dict:
    entry = {"kind": "trainer", "t": t, "paused": 1 if state.get("paused") else 0,
             "loss": state.get("last_loss") if state.get("last_loss") is not None else ""}
    entry.update({out: state.get(key) or 0 for out, key in TRAINER_FIELDS})
    return entry


def _field(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _decode(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        k, v = (x.decode() if isinstance(x, bytes) else x for x in (k, v))
        out[k] = v if k in ("kind", "version", "label") else (float(v) if v != "" else None)
    return out


# ---- routes -------------------------------------------------------------------------------------------------
def _static(name: str) -> bytes:
    return (resources.files("onspec.cluster") / "static" / name).read_bytes()


def add_dashboard_routes(app: FastAPI, history: History, snapshot) -> None:
    """``snapshot``: async () -> {"serving", "events", "replicas", "errors"} (cluster/api/admin.py builds it from the
    registry and the replicas)."""

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(_static("dashboard.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/static/{name}")
    async def static(name: str):
        if name not in STATIC:  # a fixed list: no path ever reaches the file system from the URL
            raise HTTPException(404, f"no such file: {name[:80]}")
        return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/data")
    async def data(window_s: float = Query(3600.0, allow_inf_nan=False)):  # NaN: no JSON answer (a 500)
        window_s = min(max(window_s, 60.0), WINDOW_MAX_S)
        now = time.time()
        errors = []
        try:
            entries = await asyncio.to_thread(history.read, now - window_s)
        except Exception as e:  # noqa: BLE001 -- the page still shows the live sums and says why the past is missing
            entries = []
            errors.append(f"history unavailable: {type(e).__name__}: {e}")
        if history.last_error:
            errors.append(f"history not written: {history.last_error}")
        snap = await snapshot()
        events = [e for e in snap.pop("events") if (e.get("at") or 0) > now - window_s]
        return {"now": now, "window_s": window_s, "interval_s": history.interval_s, "store": history.store,
                "points": [e for e in entries if e.get("kind") == "traffic"] + history.live(),
                "trainer": [e for e in entries if e.get("kind") == "trainer"], "events": events,
                **snap, "errors": errors + snap.get("errors", [])}
