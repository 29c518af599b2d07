"""The drafter registry's admin endpoints and the `onspec drafter` commands that call them, against a real
redis-server and (for the CLI) a real uvicorn server."""
import contextlib
import json
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import tiny_drafter, tiny_target
from fastapi.testclient import TestClient
from onspec.actors.registry import DrafterRegistry
from onspec.cluster.api import create_app
from onspec.cluster.cli import main
from onspec.actors.config import OnspecConfig
from onspec.cluster.redis_server import free_port

PREFIX = "test:drafters"


class StubBackend:
    """The generation backend is not under test here."""

    async def complete(self, request):
        raise RuntimeError("no engine in these tests")

    async def ready(self):
        return {"redis": "disabled"}

    async def stats(self):
        return {"replica_id": "stub"}


@pytest.fixture(scope="module")
def target():
    return tiny_target()


drafter = tiny_drafter


@pytest.fixture()
def server(redis_server):
    return redis_server


@pytest.fixture()
def reg(server, tmp_path, target):
    """base serving, v1 and v2 candidates; v1 evaluated."""
    registry = DrafterRegistry.from_url(server.url, tmp_path / "data", PREFIX)
    registry.ensure_registered(drafter(target))
    registry.register(drafter(target, 0.01), parent="base")
    registry.register(drafter(target, 0.02), parent="v1")
    registry.record_evaluation("v1", {"acceptance_rate": 0.61})
    yield registry
    registry.r.close()


def config(tmp_path, redis_url=None) -> OnspecConfig:
    return OnspecConfig(data_dir=tmp_path / "data").merged(**{"redis.url": redis_url, "registry.prefix": PREFIX})


@pytest.fixture()
def client(reg, tmp_path):
    with TestClient(create_app(config(tmp_path), StubBackend(), registry=reg)) as c:
        yield c


def error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- HTTP ---------------------------------------------------------------------------------------------------
def test_list_and_show(client, reg):
    r = client.get("/v1/admin/drafters")
    assert r.status_code == 200
    data = r.json()
    assert data["serving"] == "base"
    assert [(d["version"], d["status"], d["parent_version"]) for d in data["drafters"]] == \
        [("base", "serving", None), ("v1", "candidate", "base"), ("v2", "candidate", "v1")]
    assert all("manifest" not in d for d in data["drafters"])
    assert data["drafters"][1]["evaluation"] == {"acceptance_rate": 0.61}
    r = client.get("/v1/admin/drafters/v1")
    assert r.status_code == 200
    assert r.json()["manifest"]["sha256"] == reg.show("v1")["sha256"]


def test_unknown_and_invalid_versions(client):
    err = error(client.get("/v1/admin/drafters/v9"), 404)
    assert "unknown drafter version 'v9'" in err["message"] and err["code"] == "drafter_not_found"
    assert "unknown drafter version" in error(client.post("/v1/admin/drafters/v9/promote"), 404)["message"]
    for bad in ("bad$name", "x" * 65):
        err = error(client.get(f"/v1/admin/drafters/{bad}"), 400)
        assert "invalid drafter version" in err["message"] and err["param"] == "version"
        error(client.post(f"/v1/admin/drafters/{bad}/promote"), 400)


def test_promote_over_http_changes_serving(client, reg):
    r = client.post("/v1/admin/drafters/v1/promote", json={"reason": "held-back acceptance 0.61 > 0.55"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert (res["version"], res["previous"], res["changed"], res["action"]) == ("v1", "base", True, "promote")
    assert reg.serving() == "v1" and reg.show("v1")["reason"] == "held-back acceptance 0.61 > 0.55"
    assert reg.show("base")["status"] == "retired"
    r = client.post("/v1/admin/drafters/v2/promote")  # the body is optional
    assert r.status_code == 200 and reg.serving() == "v2"
    assert reg.history()[-1]["reason"] == "promoted by an operator"
    assert client.post("/v1/admin/drafters/v2/promote").json()["changed"] is False


def test_bad_bodies_are_400(client, reg):
    url = "/v1/admin/drafters/v1/promote"
    assert error(client.post(url, content=b"{oops"), 400)["code"] == "invalid_json"
    assert error(client.post(url, json=["v1"]), 400)["code"] == "invalid_json"
    err = error(client.post(url, json={"reasn": "typo"}), 400)
    assert err["param"] == "reasn"
    assert error(client.post("/v1/admin/drafters/rollback", json={"version": "../x"}), 400)["param"] == "version"
    assert reg.serving() == "base"


def test_rollback_over_http(client, reg):
    reg.promote("v1")
    reg.promote("v2")
    r = client.post("/v1/admin/drafters/rollback")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v1" and reg.serving() == "v1"
    assert client.post("/v1/admin/drafters/rollback", json={"reason": "still worse"}).json()["version"] == "base"
    assert reg.history()[-1]["reason"] == "still worse"
    err = error(client.post("/v1/admin/drafters/rollback"), 409)
    assert "nothing to roll back to" in err["message"]
    r = client.post("/v1/admin/drafters/rollback", json={"version": "v2"})
    assert r.status_code == 200 and reg.serving() == "v2"
    assert "unknown drafter version" in error(client.post("/v1/admin/drafters/rollback",
                                                          json={"version": "v9"}), 404)["message"]


def test_without_redis_the_admin_endpoints_say_so(tmp_path):
    with TestClient(create_app(config(tmp_path), StubBackend())) as c:
        err = error(c.get("/v1/admin/drafters"), 503)
        assert "needs Redis" in err["message"]
        assert c.get("/healthz").status_code == 200  # the rest of the app is unaffected


def test_unreachable_redis_is_503_not_a_traceback(tmp_path):
    cfg = config(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(cfg, StubBackend())) as c:
        for resp in (c.get("/v1/admin/drafters"), c.post("/v1/admin/drafters/v1/promote"),
                     c.post("/v1/admin/drafters/rollback")):
            err = error(resp, 503)
            assert "cannot reach Redis" in err["message"] and "Traceback" not in resp.text


def test_redis_dying_later_is_503(client, server):
    assert client.get("/v1/admin/drafters").status_code == 200
    server.kill()
    assert "cannot reach Redis" in error(client.get("/v1/admin/drafters/v1"), 503)["message"]


def test_the_registry_is_built_from_the_redis_url(server, tmp_path, reg):
    with TestClient(create_app(config(tmp_path, redis_url=server.url), StubBackend())) as c:
        assert c.get("/v1/admin/drafters").json()["serving"] == "base"


# ---- CLI ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def live(app, timeout=30.0):
    """``app`` on a real uvicorn server in a thread; yields its URL once /healthz answers."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not come up"
            time.sleep(0.02)
        yield url
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture()
def url(reg, tmp_path):
    with live(create_app(config(tmp_path), StubBackend(), registry=reg)) as u:
        yield u


def run(capsys, *argv):
    rc = main(["drafter", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_list_and_show(url, reg, capsys):
    reg.record_evaluation("v2", {"candidate": {"gate": 0.7}, "serving": {"gate": 0.6}})  # the trainer's shape
    rc, out, _ = run(capsys, "list", "--url", url)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "STATUS", "PARENT", "ACCEPTANCE", "CREATED"]
    assert lines[1].split()[:4] == ["*", "base", "serving", "-"]
    assert lines[2].split()[:4] == ["v1", "candidate", "base", "0.610"]
    assert lines[3].split()[:4] == ["v2", "candidate", "v1", "0.700"]
    assert len(lines[3].split()) == 6  # then the creation date and time
    rc, out, _ = run(capsys, "list", "--url", url, "--json")
    assert rc == 0 and json.loads(out)["serving"] == "base"
    rc, out, _ = run(capsys, "show", "v1", "--url", url)
    assert rc == 0 and "candidate" in out and '{"acceptance_rate": 0.61}' in out
    rc, out, _ = run(capsys, "show", "v1", "--url", url, "--json")
    assert rc == 0 and json.loads(out)["parent_version"] == "base"


def test_cli_promote_and_rollback(url, reg, capsys):
    rc, out, _ = run(capsys, "promote", "v1", "--url", url, "--reason", "better on math")
    assert rc == 0 and "v1 is now serving (was base)" in out
    assert reg.serving() == "v1" and reg.history()[-1]["reason"] == "better on math"
    rc, out, _ = run(capsys, "promote", "v2", "--url", url, "--json")
    assert rc == 0 and json.loads(out)["previous"] == "v1"
    rc, out, _ = run(capsys, "rollback", "--url", url)
    assert rc == 0 and "v1 is now serving (was v2)" in out and reg.serving() == "v1"
    rc, out, _ = run(capsys, "rollback", "v2", "--url", url, "--reason", "v1 regressed")
    assert rc == 0 and reg.serving() == "v2" and reg.history()[-1]["reason"] == "v1 regressed"


def test_cli_errors_are_one_line(url, reg, capsys):
    for argv, needle in ((["show", "v9"], "unknown drafter version 'v9'"),
                         (["promote", "v9"], "unknown drafter version 'v9'"),
                         (["promote", "a/b"], "invalid drafter version 'a/b'")):
        rc, out, err = run(capsys, *argv, "--url", url)
        assert rc == 2 and err.startswith("onspec: error: ") and needle in err, err
        assert "Traceback" not in err and not out
    rc, _, err = run(capsys, "rollback", "--url", url)
    assert rc == 2 and "nothing to roll back to: base is the first serving drafter (HTTP 409" in err
    assert reg.serving() == "base"


def test_cli_unreachable_server(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    rc, out, err = run(capsys, "list", "--url", url)
    assert rc == 2 and not out
    assert err.startswith(f"onspec: error: cannot reach the onspec server at {url}") and "Traceback" not in err


def test_trainer_state_is_503_without_a_trainer(reg, tmp_path):
    from fastapi.testclient import TestClient

    cfg = OnspecConfig(data_dir=tmp_path / "data")
    with TestClient(create_app(cfg, StubBackend(), registry=reg)) as c:
        r = c.get("/v1/admin/trainer")
    assert r.status_code == 503 and "no online trainer" in r.json()["error"]["message"]

    class WithTrainer(StubBackend):
        async def trainer(self):
            return {"steps": 7, "serving_version": "base"}

    with TestClient(create_app(cfg, WithTrainer(), registry=reg)) as c:
        assert c.get("/v1/admin/trainer").json() == {"steps": 7, "serving_version": "base"}
