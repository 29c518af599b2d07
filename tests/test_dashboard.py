"""/metrics's drift series, the dashboard's history (a real redis-server) and its page, with a stub engine backend:
what the ingress does with each finished request's usage is under test, not generation."""
import asyncio
import re
import time
from pathlib import Path

import pytest
import redis
import torch
from conftest import tiny_target
from fastapi.testclient import TestClient
from onspec.actors.models import derive_drafter
from onspec.actors.registry import DrafterRegistry
from onspec.cluster.api import create_app
from onspec.cluster.api.metrics import MAX_METRIC_VERSIONS, Metrics
from onspec.actors.config import OnspecConfig
from onspec.cluster.dashboard import STATIC, History
from onspec.cluster.redis_server import free_port
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

PREFIX = "test:drafters"
STATIC_DIR = Path(__file__).resolve().parents[1] / "cluster" / "static"


def usage(version="v1", completion=10, drafted=8, accepted=4, steps=6) -> dict:
    return {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0, "drafted_tokens": drafted,
            "accepted_tokens": accepted, "tokens_per_step": round(completion / steps, 4),
            "drafter_version": version}


class StubBackend:
    """Answers every request with the usage queued in ``usages`` (the last one repeats)."""

    def __init__(self, trainer_state=None):
        self.usages = [usage()]
        self.trainer_state = trainer_state
        self.replica = {"replica_id": "r1", "drafter_version": "v1", "in_flight": 0, "drafter_swaps": 1,
                        "generate_s": 1.5, "observer_s": 0.01,
                        "logger": {"written": 5, "dropped": 1, "errors": 0, "pending": 2, "cpu_s": 0.1}}

    def _usage(self):
        return self.usages.pop(0) if len(self.usages) > 1 else self.usages[0]

    async def complete(self, req):
        u = self._usage()
        return {"type": "result", "text": "x" * u["completion_tokens"], "token_ids": [], "finish_reason": "length",
                "usage": u, "replica": {**self.replica, "drafter_version": u["drafter_version"]}}

    async def stream(self, req):
        u = self._usage()
        yield {"type": "start", "prompt_tokens": 3}
        yield {"type": "delta", "text": "x", "token_ids": [1]}
        yield {"type": "end", "finish_reason": "length", "usage": u,
               "replica": {**self.replica, "drafter_version": u["drafter_version"]}}

    async def ready(self):
        return {"redis": "disabled"}

    async def stats(self):
        return self.replica

    async def trainer(self):
        return self.trainer_state


TRAINER = {"serving_version": "v1", "steps": 12, "record_steps": 10, "onpolicy_steps": 2, "records_read": 40,
           "records_acked": 36, "records_skipped": 1, "held_back": 4, "candidates": 2, "promoted": ["v1"],
           "rejected": ["v2"], "last_loss": 0.42, "last_eval": {}, "busy_waits": 3, "train_s": 9.5,
           "fresh": 0, "replay": 30, "holdout": 4, "paused": False, "alive": True}


def samples(text: str) -> dict[tuple, float]:
    """{(name, sorted label items): value} of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def complete(client, label=None, stream=False):
    body = {"prompt": "hi", "max_tokens": 10, **({"label": label} if label else {}), "stream": stream}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def server(module_redis_server):
    return module_redis_server


@pytest.fixture()
def rclient(server):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture()
def reg(server, rclient, tmp_path, target):
    """base, then v1 promoted, then rolled back to base, then v1 again: init, 2 promotions, 1 rollback."""
    counts = torch.arange(target.config.vocab_size, 0, -1).double()
    registry = DrafterRegistry.from_url(server.url, tmp_path / "data", PREFIX)
    registry.ensure_registered(derive_drafter(target, 2, 64, counts=counts))
    registry.register(derive_drafter(target, 2, 64, counts=counts), parent="base")
    registry.promote("v1")
    registry.rollback()
    registry.promote("v1", reason="again")
    yield registry
    registry.r.close()


def config(tmp_path) -> OnspecConfig:
    return OnspecConfig(data_dir=tmp_path / "data").merged(**{"registry.prefix": PREFIX})


# ---- metrics ------------------------------------------------------------------------------------------------
def test_drift_series_are_split_by_version_and_label(tmp_path):
    backend = StubBackend()
    backend.usages = [usage("v1"), usage("v1", drafted=0, accepted=0, steps=10), usage("v2", completion=12,
                      drafted=12, accepted=9, steps=4)]
    with TestClient(create_app(config(tmp_path), backend)) as c:
        complete(c, "math")
        complete(c, "math", stream=True)
        complete(c)
        m = c.get("/metrics").text
    both = {"drafter_version": "v1", "label": "math"}
    assert value(m, "onspec_served_requests_total", **both) == 2
    assert value(m, "onspec_generated_tokens_total", **both) == 20
    assert value(m, "onspec_drafted_tokens_total", **both) == 8
    assert value(m, "onspec_accepted_tokens_total", **both) == 4
    assert value(m, "onspec_verification_steps_total", **both) == 16  # recovered from tokens_per_step
    assert value(m, "onspec_accepted_tokens_total", drafter_version="v2", label="") == 9
    # A request that drafted nothing has no acceptance rate: not observed, but its draft length (0) is.
    assert value(m, "onspec_request_acceptance_rate_count", drafter_version="v1") == 1
    assert value(m, "onspec_request_acceptance_rate_sum", drafter_version="v1") == 0.5
    assert value(m, "onspec_request_draft_length_bucket", drafter_version="v1", le="0.0") == 1
    assert value(m, "onspec_request_draft_length_sum", drafter_version="v1") == 8 / 5
    assert value(m, "onspec_request_tokens_per_step_sum", drafter_version="v2") == 3.0
    # The existing per-label series are unchanged.
    assert 'onspec_spec_draft_tokens_total{label="math"} 8.0' in m
    assert value(m, "onspec_replica_drafter_info", replica="r1", drafter_version="v1") == 1
    assert value(m, "onspec_trainer_up") == 0 and "onspec_trainer_steps_total" not in m


def test_version_and_label_series_are_bounded():
    metrics = Metrics()
    for i in range(MAX_METRIC_VERSIONS + 5):
        metrics.finished(f"label{i}", usage(f"v{i}"), None)
    assert metrics.version("v0") == "v0" and metrics.version("v999") == "other"
    assert metrics.label("label1") == "label1" and metrics.label("new") == "other"
    assert metrics.finished(None, usage(None), None) == ("none", "")


def test_trainer_and_registry_series(tmp_path, reg):
    with TestClient(create_app(config(tmp_path), StubBackend(TRAINER), registry=reg)) as c:
        m = c.get("/metrics").text
    assert value(m, "onspec_trainer_up") == 1
    assert value(m, "onspec_trainer_steps_total") == 12
    assert value(m, "onspec_trainer_loss") == 0.42
    assert value(m, "onspec_trainer_records_consumed_total") == 36
    assert value(m, "onspec_trainer_paused_for_load_total") == 3
    assert value(m, "onspec_trainer_paused") == 0
    assert value(m, "onspec_trainer_gate_decisions_total", decision="rejected") == 1
    assert value(m, "onspec_drafter_serving_info", drafter_version="v1") == 1
    assert value(m, "onspec_drafter_promotions_total") == 2
    assert value(m, "onspec_drafter_rollbacks_total") == 1
    assert value(m, "onspec_drafter_last_change_timestamp_seconds") == pytest.approx(reg.history()[-1]["at"])


def test_metrics_without_redis_or_with_redis_down(tmp_path):
    cfg = config(tmp_path).merged(**{"redis.url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(cfg, StubBackend())) as c:
        complete(c)
        r = c.get("/metrics")
        assert r.status_code == 200 and "onspec_drafter_serving_info" not in r.text
        data = c.get("/dashboard/data").json()
    assert data["points"] and data["points"][0]["live"]  # the live sums still show
    assert any("history unavailable" in e for e in data["errors"])
    assert any("drafter registry" in e for e in data["errors"])


# ---- history ------------------------------------------------------------------------------------------------
def test_history_goes_to_redis_and_survives_a_new_app(tmp_path, reg, rclient):
    def app():
        return create_app(config(tmp_path), StubBackend(TRAINER), registry=reg,
                          history=History(lambda: reg.r, key="test:history", interval_s=0.05))

    with TestClient(app()) as c:
        complete(c, "math")
        complete(c, "code", stream=True)
        deadline = time.monotonic() + 10
        while rclient.xlen("test:history") < 3:  # two traffic entries and a trainer one
            assert time.monotonic() < deadline, "the flusher wrote nothing"
            time.sleep(0.02)
    with TestClient(app()) as c:  # a fresh ingress (or a reloaded page) reads the past back from Redis
        data = c.get("/dashboard/data", params={"window_s": 600}).json()
    traffic = {(p["version"], p["label"]): p for p in data["points"] if not p.get("live")}
    assert set(traffic) == {("v1", "math"), ("v1", "code")}
    p = traffic[("v1", "math")]
    assert (p["requests"], p["tokens"], p["drafted"], p["accepted"], p["steps"]) == (1, 10, 8, 4, 6)
    assert 0 < p["dt"] < 5 and p["latency_s"] > 0
    assert data["trainer"][0]["loss"] == 0.42 and data["trainer"][0]["consumed"] == 36
    assert data["store"] == "redis" and data["serving"] == "v1"
    assert [e["action"] for e in data["events"]] == ["init", "promote", "rollback", "promote"]
    assert data["replicas"][0]["drafter_version"] == "v1"


def test_history_is_bounded(rclient):
    h = History(lambda: rclient, key="test:bounded", maxlen=200)
    for i in range(10):
        h.write([{"kind": "traffic", "t": time.time(), "version": "v1", "label": str(j)} for j in range(100)])
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): near the bound, never far above it.
    assert 200 <= rclient.xlen("test:bounded") <= 300


def test_a_failed_write_keeps_the_sums(rclient):
    h = History(lambda: redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0)))
    h.add("v1", "math", usage(), 6, 0.5)
    asyncio.run(h.flush())
    assert h.last_error and h.pending[("v1", "math")]["requests"] == 1
    h._client = rclient  # Redis is back
    h.add("v1", "math", usage(), 6, 0.5)
    asyncio.run(h.flush())
    entry = h.read(time.time() - 60)[0]
    assert entry["requests"] == 2 and entry["tokens"] == 20 and h.last_error is None


def test_without_redis_history_stays_in_memory(tmp_path):
    with TestClient(create_app(config(tmp_path), StubBackend())) as c:
        complete(c, "math")
        c.app.state.history.since -= 5  # as if the interval had passed
        asyncio.run(c.app.state.history.flush())
        data = c.get("/dashboard/data", params={"window_s": 1}).json()  # clamped to a minute
    assert data["store"] == "memory" and data["window_s"] == 60
    assert [p["requests"] for p in data["points"]] == [1] and not data["points"][0].get("live")


# ---- the page -----------------------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_and_self_contained(tmp_path):
    with TestClient(create_app(config(tmp_path), StubBackend())) as c:
        page = c.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            if ref.startswith("data:"):  # inline (the empty favicon)
                continue
            assert not re.match(r"[a-z]+:|//", ref), ref  # relative: works offline and behind a path prefix
            assert c.get("/" + ref).status_code == 200, ref
        for name in STATIC:
            assert c.get(f"/dashboard/static/{name}").status_code == 200
        for bad in ("dashboard.html.bak", "..%2Fapi.py", "%2e%2e%2fdashboard.py"):
            assert c.get(f"/dashboard/static/{bad}").status_code == 404
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        # The one absolute URL is the SVG namespace's name, which no browser fetches.
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (f.name, urls)
    pyproject = (STATIC_DIR.parents[1] / "pyproject.toml").read_text()
    assert all(f"static/*{Path(n).suffix}" in pyproject for n in [*STATIC, "dashboard.html"])
