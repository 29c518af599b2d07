"""Security and request limits (docs/security.md): bearer keys and scopes, key files, per-key concurrency,
body and prompt limits, no keys or user text in logs, localhost-only without keys, Redis with a password, the
admin CLI with a key, and the Helm chart feeding the key Secrets to the server.

In-process: the real app (cluster/api/) over a real Replica with a fake engine (tests/fake_backend.py); a real
redis-server for the password; a real uvicorn server for the CLI."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
import yaml
from fastapi.testclient import TestClient
from conftest import poll
from onspec.actors.registry import DrafterRegistry
from onspec.actors.stream_logger import StreamLogger
from onspec.cluster.api import create_app
from onspec.cluster.api.auth import Keys, presented_key, required_scope
from onspec.cluster.cli import CLIError, bind_message, main
from onspec.actors.config import OnspecConfig, SecretFileError, read_key_file
from onspec.cluster.dashboard import History
from onspec.cluster.redis_server import RedisServer, free_port
from onspec.cluster.serve import shown_url, with_redis_password
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.fake_backend import GatedBackend, ReplicaBackend

API_KEY, ADMIN_KEY = "sk-test-api-7f3a9c2e51", "sk-test-admin-0b8d4e6f93"
SECRET_PROMPT = "zqxjvortex plumbago-8812 quillwort"  # distinctive: must never reach a log
ROOT = Path(__file__).resolve().parent.parent


def keyed(tmp_path=None, **overrides) -> OnspecConfig:
    cfg = OnspecConfig(data_dir=tmp_path or Path(".onspec-data"))
    return cfg.merged(**{"server.api_keys": [API_KEY], "server.admin_keys": [ADMIN_KEY], **overrides})


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def app_for(cfg: OnspecConfig, backend=None):
    return create_app(cfg, backend or ReplicaBackend(cfg, {"steps": 1}), history=History())


def error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


COMPLETION = {"prompt": "say hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "say hi"}], "max_tokens": 2}


@pytest.fixture()
def client():
    with TestClient(app_for(keyed())) as c:
        yield c


# ---- keys and scopes ----------------------------------------------------------------------------------------
def test_no_key_or_a_bad_key_is_401(client):
    for headers in ({}, bearer("sk-not-a-key-123"), {"Authorization": "Basic " + API_KEY}, bearer(""),
                    {"Authorization": API_KEY}):
        for method, path, body in (("post", "/v1/completions", COMPLETION), ("post", "/v1/chat/completions", CHAT),
                                   ("get", "/v1/models", None), ("get", "/v1/admin/drafters", None),
                                   ("get", "/dashboard/data", None)):
            r = getattr(client, method)(path, headers=headers, **({"json": body} if body else {}))
            err = error(r, 401)
            assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert "sk-not-a-key" not in r.text and API_KEY not in r.text
    assert "no API key" in error(client.get("/v1/models"), 401)["message"]
    assert error(client.get("/v1/models", headers=bearer("sk-not-a-key-123")), 401)["message"] == \
        "the API key is not valid"


def test_api_key_is_403_on_admin_endpoints(client):
    for method, path in (("get", "/v1/admin/drafters"), ("get", "/v1/admin/drafters/base"),
                         ("post", "/v1/admin/drafters/base/promote"), ("post", "/v1/admin/drafters/rollback"),
                         ("get", "/v1/admin/trainer")):
        r = getattr(client, method)(path, headers=bearer(API_KEY))
        err = error(r, 403)
        assert err["code"] == "insufficient_scope" and "admin" in err["message"] and "API key" in err["message"]
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


def test_api_key_works_on_inference(client):
    assert client.post("/v1/completions", json=COMPLETION, headers=bearer(API_KEY)).json()["choices"][0]["text"]
    assert client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": API_KEY}).status_code == 200
    assert client.get("/v1/models", headers=bearer(API_KEY)).json()["data"][0]["id"]
    assert client.get("/dashboard/data", headers=bearer(API_KEY)).status_code == 200


def test_admin_key_works_on_admin_and_inference(client):
    h = bearer(ADMIN_KEY)
    assert client.get("/v1/admin/trainer", headers=h).json() == {"steps": 1}
    # Past authentication: the registry's own answer (this app has no Redis), not a refusal.
    assert error(client.get("/v1/admin/drafters", headers=h), 503)["code"] == "registry_unavailable"
    assert client.post("/v1/completions", json=COMPLETION, headers=h).status_code == 200
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=h)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_open_paths_and_unknown_paths(client):
    for path in ("/healthz", "/readyz", "/metrics", "/dashboard", "/dashboard/static/dashboard.js"):
        assert client.get(path).status_code == 200, path
    error(client.get("/nowhere"), 401)  # anything not listed as open needs a key ...
    error(client.get("/nowhere", headers=bearer(API_KEY)), 404)  # ... and is then just unknown
    assert [required_scope(p) for p in ("/healthz", "/v1/models", "/v1/admin", "/v1/admin/x", "/v1/adminx",
                                        "/dashboard/static/x.js", "/dashboard/data")] == \
        [None, "api", "admin", "admin", "api", None, "api"]


def test_refusals_are_counted_in_the_metrics(client):
    client.post("/v1/completions", json=COMPLETION)
    text = client.get("/metrics").text
    assert 'onspec_requests_total{endpoint="completions",status="401"} 1.0' in text


def test_without_keys_there_is_no_authentication():
    cfg = OnspecConfig()
    with TestClient(app_for(cfg)) as c:
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        assert c.get("/v1/admin/trainer").status_code == 200
        assert c.get("/dashboard/data").status_code == 200
        assert c.get("/nowhere").status_code == 404


def test_key_comparison():
    keys = Keys([API_KEY, "sk-shared-key-1"], [ADMIN_KEY, "sk-shared-key-1"])
    assert keys.check(API_KEY.encode())[0] == "api"
    assert keys.check(ADMIN_KEY.encode())[0] == "admin"
    assert keys.check(b"sk-shared-key-1")[0] == "admin"  # in both lists: the wider scope
    for wrong in (API_KEY[:-1].encode(), (API_KEY + "x").encode(), b"", API_KEY.upper().encode()):
        assert keys.check(wrong)[0] is None
    kid = keys.check(API_KEY.encode())[1]
    assert kid == keys.check(API_KEY.encode())[1] and API_KEY not in kid and kid != keys.check(ADMIN_KEY.encode())[1]
    assert not Keys([], []).enabled
    assert presented_key([(b"authorization", b"bearer  abc  ")]) == b"abc"
    assert presented_key([(b"authorization", b"Token abc")]) is None
    assert presented_key([(b"x-api-key", b"abc")]) == b"abc" and presented_key([]) is None


# ---- key files ----------------------------------------------------------------------------------------------
def test_key_files(tmp_path):
    f = tmp_path / "api-keys"
    f.write_text("# clients\n\n  sk-file-key-00001  \n# rotated:\nsk-file-key-00002\n\n")
    assert read_key_file(f) == ["sk-file-key-00001", "sk-file-key-00002"]
    admin = tmp_path / "admin-keys"
    admin.write_text(ADMIN_KEY + "\n")
    cfg = keyed(tmp_path).merged(**{"server.api_key_file": str(f), "server.admin_key_file": str(admin)})
    assert cfg.server.keys() == ([API_KEY, "sk-file-key-00001", "sk-file-key-00002"], [ADMIN_KEY])
    with TestClient(app_for(cfg)) as c:
        assert c.get("/v1/models", headers=bearer("sk-file-key-00002")).status_code == 200
        error(c.get("/v1/admin/drafters", headers=bearer("sk-file-key-00001")), 403)


def test_bad_key_files_are_clear_errors(tmp_path):
    with pytest.raises(SecretFileError, match="does not exist"):
        read_key_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(SecretFileError, match="holds no key"):
        read_key_file(tmp_path / "empty")
    (tmp_path / "bad").write_text("sk-good-key-0001\nthis secret has spaces\n")
    with pytest.raises(SecretFileError, match=r"bad, line 2: a key is one word") as e:
        read_key_file(tmp_path / "bad")
    assert "secret has spaces" not in str(e.value)
    cfg = OnspecConfig().merged(**{"server.api_key_file": str(tmp_path / "missing")})
    with pytest.raises(SecretFileError, match="does not exist"):
        create_app(cfg, ReplicaBackend(cfg))  # the server fails to build, it does not run open
    r = subprocess.run([sys.executable, "-m", "onspec.cluster.cli", "serve", "--api-key-file",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "onspec: error: the key file" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_keys_never_in_repr_dumps_or_errors(caplog):
    caplog.set_level(logging.DEBUG)
    cfg = keyed().merged(**{"redis.password": "redis-pw-c0ffee"})
    for text in (repr(cfg), str(cfg), repr(cfg.server), cfg.model_dump_json(), json.dumps(cfg.model_dump(mode="json")),
                 str(cfg.model_dump())):
        assert API_KEY not in text and ADMIN_KEY not in text and "redis-pw-c0ffee" not in text
    assert cfg.model_dump(mode="json")["server"]["api_keys"] == ["**********"]
    # Between processes the config travels with its secrets (wire); a masked dump does not validate back.
    assert OnspecConfig.model_validate(cfg.wire()).server.keys() == ([API_KEY], [ADMIN_KEY])
    with pytest.raises(ValidationError, match="masked"):
        OnspecConfig.model_validate(cfg.model_dump(mode="json"))
    with pytest.raises(ValidationError) as e:
        OnspecConfig.model_validate({"server": {"api_keys": ["my secret key"]}})
    assert "my secret key" not in str(e.value)
    with TestClient(app_for(cfg)) as c:
        c.get("/v1/models", headers=bearer(API_KEY))
        c.get("/v1/models", headers=bearer(API_KEY + "-wrong"))
    assert API_KEY not in caplog.text and ADMIN_KEY not in caplog.text


# ---- request limits -----------------------------------------------------------------------------------------
async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0)


def test_concurrent_requests_per_key_429():
    cfg = keyed(**{"server.max_concurrent_per_key": 1})

    async def scenario():
        backend = GatedBackend(cfg)
        app = app_for(cfg, backend)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post("/v1/completions", json=COMPLETION, headers=bearer(API_KEY)))
            await _until(lambda: backend.entered == 1)
            r = await c.post("/v1/completions", json=COMPLETION, headers=bearer(API_KEY))
            err = error(r, 429)
            assert err["code"] == "rate_limit_exceeded" and "at most 1 in flight" in err["message"]
            assert r.headers["retry-after"] == "1"
            assert (await c.get("/v1/models", headers=bearer(API_KEY))).status_code == 200  # only generation
            other = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=bearer(ADMIN_KEY)))
            await _until(lambda: backend.entered == 2)  # another key has its own slots
            assert len(app.state.limiter.in_flight) == 2
            assert all(API_KEY not in k for k in app.state.limiter.in_flight)
            backend.gate.set()
            assert (await first).status_code == 200 and (await other).status_code == 200
            assert app.state.limiter.in_flight == {}
            r = await c.post("/v1/completions", json=COMPLETION, headers=bearer(API_KEY))
            assert r.status_code == 200  # the slot came back

    asyncio.run(scenario())


def test_stream_left_early_frees_the_slot():
    """A client that disconnects mid-stream: the generation is closed and the key's slot released."""
    cfg = keyed(**{"server.max_concurrent_per_key": 1})
    backend = GatedBackend(cfg)
    app = app_for(cfg, backend)

    async def call(body: dict) -> list[dict]:
        gone, sent, messages = asyncio.Event(), [False], []

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                gone.set()  # the client leaves after the first chunk

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {API_KEY}".encode())],
                 "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
        await asyncio.wait_for(app(scope, receive, send), 30)
        return messages

    async def scenario():
        messages = await call({**CHAT, "stream": True})
        assert messages[0]["status"] == 200 and b"assistant" in messages[1]["body"]
        assert backend.streams_closed == 1
        # The cancel reaches the replica's decoding thread through its inbox: it retires the request soon after.
        poll(lambda: backend.replica.in_flight == 0, "the replica kept the abandoned stream in flight", 10)
        assert app.state.limiter.in_flight == {}
        backend.gate.set()
        messages = await call({**CHAT, "stream": True})  # the same key again: admitted
        assert messages[0]["status"] == 200

    asyncio.run(scenario())


def test_413_body_size():
    cfg = keyed(**{"server.max_body_bytes": 1024})
    with TestClient(app_for(cfg)) as c:
        big = {"prompt": "x " * 2000}
        err = error(c.post("/v1/completions", json=big, headers=bearer(API_KEY)), 413)
        assert err["code"] == "body_too_large" and "over 1024 bytes" in err["message"]
        # Chunked (no content-length): reading stops at the limit.
        chunks = (b'{"prompt": "' + b"y" * 300 for _ in range(10))
        r = c.post("/v1/completions", content=chunks, headers={**bearer(API_KEY), "content-type": "application/json"})
        assert error(r, 413)["code"] == "body_too_large"
        error(c.post("/v1/admin/drafters/rollback", json={"reason": "r" * 2000}, headers=bearer(ADMIN_KEY)), 413)
        # Deeply nested JSON is a 400, not a RecursionError.
        deep = b"[" * 100_000 + b"]" * 100_000
        cfg2 = keyed(**{"server.max_body_bytes": 1 << 20})
    with TestClient(app_for(cfg2)) as c:
        r = c.post("/v1/completions", content=deep, headers={**bearer(API_KEY), "content-type": "application/json"})
        assert error(r, 400)["code"] == "invalid_json"


def test_413_prompt_tokens_from_the_replica():
    cfg = keyed(**{"server.max_prompt_tokens": 5})
    with TestClient(app_for(cfg)) as c:
        h = bearer(API_KEY)
        assert c.post("/v1/completions", json={"prompt": "one two three four five"}, headers=h).status_code == 200
        for path, body in (("/v1/completions", {"prompt": "one two three four five six"}),
                           ("/v1/completions", {"prompt": ["one two three four five six"], "stream": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c d e f"}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c d e f"}],
                                                     "stream": True})):
            err = error(c.post(path, json=body, headers=h), 413)
            assert err["code"] == "prompt_too_long" and "6 tokens, over this server's limit of 5" in err["message"]
            assert err["param"] in ("prompt", "messages")
    with TestClient(app_for(keyed())) as c:  # no limit: the context length still gives its 400
        err = error(c.post("/v1/completions", json={"prompt": "w " * 100}, headers=bearer(API_KEY)), 400)
        assert err["code"] == "context_length_exceeded"
        err = error(c.post("/v1/completions", json={**COMPLETION, "max_tokens": 10**6}, headers=bearer(API_KEY)),
                    400)
        assert err["param"] == "max_tokens" and "at most 4096" in err["message"]


def test_no_user_text_or_keys_in_logs(caplog):
    caplog.set_level(logging.DEBUG)
    cfg = keyed(**{"server.max_prompt_tokens": 8})
    backend = ReplicaBackend(cfg)
    with TestClient(app_for(cfg, backend)) as c:
        h = bearer(API_KEY)
        assert c.post("/v1/completions", json={"prompt": SECRET_PROMPT, "label": "t"}, headers=h).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SECRET_PROMPT}],
                                                 "stream": True, "stream_options": {"include_usage": True}}, headers=h)
        assert r.status_code == 200
        error(c.post("/v1/completions", json={"prompt": SECRET_PROMPT, "temperature": 9}, headers=h), 400)
        error(c.post("/v1/completions", json={"prompt": SECRET_PROMPT * 4}, headers=h), 413)
        error(c.post("/v1/completions", json={"prompt": SECRET_PROMPT}, headers=bearer(SECRET_PROMPT.split()[0])),
              401)
        c.get("/metrics")
    assert backend.replica.engine.prompts  # the prompts did reach generation
    for word in SECRET_PROMPT.split():
        assert word not in caplog.text
    assert API_KEY not in caplog.text


# ---- localhost only without keys ----------------------------------------------------------------------------
def test_bind_without_keys_is_localhost_only(tmp_path):
    msg = bind_message(OnspecConfig())
    assert "no API keys configured" in msg and "127.0.0.1 (localhost) only" in msg
    assert "localhost" in bind_message(OnspecConfig().merged(**{"server.host": "::1"}))
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(CLIError, match=f"will not listen on {host}"):
            bind_message(OnspecConfig().merged(**{"server.host": host}))
    msg = bind_message(keyed().merged(**{"server.host": "0.0.0.0"}))
    assert "authentication on: 1 API key(s), 1 admin key(s)" in msg and API_KEY not in msg
    f = tmp_path / "keys"
    f.write_text(API_KEY + "\n")
    assert "authentication on" in bind_message(OnspecConfig().merged(**{"server.api_key_file": str(f),
                                                                        "server.host": "0.0.0.0"}))
    r = subprocess.run([sys.executable, "-m", "onspec.cluster.cli", "serve", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no API keys are configured" in r.stderr and "--api-key-file" in r.stderr
    assert "Traceback" not in r.stderr


# ---- Redis with a password ----------------------------------------------------------------------------------
def test_redis_server_with_requirepass(tmp_path):
    pw = 'pa ss"word-\\x41'
    srv = RedisServer(tmp_path / "redis", password=pw).start()
    try:
        once = {"socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}  # redis-py retries a refused AUTH otherwise
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port, **once).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port, password="wrong", **once).ping()
        assert redis.Redis(port=srv.port, password=pw, socket_timeout=5).ping()
        assert redis.Redis.from_url(srv.auth_url, socket_timeout=5).ping()
        assert "pa" not in srv.url.split("@")[0][8:] and pw not in repr(srv)
        # The cluster's clients all connect with redis.url: the password goes in there, and out of messages.
        cfg = with_redis_password(OnspecConfig(data_dir=tmp_path).merged(**{"redis.url": srv.url,
                                                                            "redis.password": pw}))
        assert redis.Redis.from_url(cfg.redis.url, socket_timeout=5).ping()
        assert shown_url(cfg.redis.url) == f"redis://***@127.0.0.1:{srv.port}/0"
        # The stream logger, the registry (hot-swap watcher, trainer, admin API) and the dashboard history.
        logger = StreamLogger.from_config(cfg, encode=lambda item: {"x": item})
        try:
            logger.log(1)
            assert logger.flush(10) and logger.ping() and logger.stats()["written"] == 1
        finally:
            logger.close()
        assert DrafterRegistry.from_url(cfg.redis.url, tmp_path, "sec:drafters").serving() is None
        assert create_app(cfg, ReplicaBackend(cfg)).state.history.client().ping()
        pwfile = tmp_path / "redis-password"
        pwfile.write_text(pw + "\n")
        cfg = with_redis_password(OnspecConfig().merged(**{"redis.url": srv.url, "redis.password_file": str(pwfile)}))
        assert redis.Redis.from_url(cfg.redis.url, socket_timeout=5).ping()
    finally:
        srv.stop()


# ---- the admin CLI with a key -------------------------------------------------------------------------------
class FakeRegistry:
    def list(self):
        return [{"version": "base", "status": "serving", "parent_version": None, "created": 1.0}]

    def serving(self):
        return "base"

    def history(self):
        return []


@contextlib.contextmanager
def live(app):
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
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


def test_cli_admin_commands_with_keys(tmp_path, capsys):
    cfg = keyed()
    app = create_app(cfg, ReplicaBackend(cfg), registry=FakeRegistry(), history=History())
    api_file, admin_file = tmp_path / "api", tmp_path / "admin"
    api_file.write_text(f"# mine\n{API_KEY}\n")
    admin_file.write_text(f"{ADMIN_KEY}\n")
    with live(app) as url:
        def run(*argv):
            rc = main(["drafter", *argv, "--url", url])
            out, err = capsys.readouterr()
            return rc, out, err

        rc, out, err = run("list")
        assert rc == 2 and "the server needs an admin key: pass --admin-key-file F" in err and "HTTP 401" in err
        rc, out, err = run("list", "--admin-key-file", str(api_file))
        assert rc == 2 and f"the key in {api_file} is not an admin key" in err and "HTTP 403" in err
        assert API_KEY not in err and "Traceback" not in err
        bad = tmp_path / "bad"
        bad.write_text("sk-wrong-key-000\n")
        rc, out, err = run("promote", "base", "--admin-key-file", str(bad))
        assert rc == 2 and f"the server refused the key in {bad}" in err and "sk-wrong" not in err
        rc, out, err = run("list", "--admin-key-file", str(tmp_path / "missing"))
        assert rc == 2 and "does not exist" in err
        rc, out, err = run("list", "--admin-key-file", str(admin_file))
        assert rc == 0 and out.splitlines()[1].split()[:3] == ["*", "base", "serving"]


# ---- Helm: the key Secrets reach the server --------------------------------------------------------------------
def test_helm_mounts_the_key_secrets():
    helm = ROOT / ".tools" / "bin" / "helm"
    if not helm.exists():
        pytest.skip("no helm in .tools (scripts/fetch_helm.sh)")
    r = subprocess.run([str(helm), "template", "r", str(ROOT / "helm" / "onspec"), "-n", "onspec",
                        "--set", "apiKey.create=true", "--set", "apiKey.keys[0]=sk-helm-api-0001",
                        "--set", "adminKey.create=true", "--set", "adminKey.keys[0]=sk-helm-admin-01"],
                       capture_output=True, text=True, timeout=120, check=True)
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    secrets = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    assert {"r-onspec-api-keys", "r-onspec-admin-keys"} <= secrets
    rs = next(o for o in objs if o["kind"] == "RayService")
    assert "sk-helm" not in rs["spec"]["serveConfigV2"]  # keys never in the custom resource
    server = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["config"]["server"]
    assert server["api_key_file"] == "/etc/onspec/keys/api-keys"
    assert server["admin_key_file"] == "/etc/onspec/keys/admin-keys"
    pods = [rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for pod in pods:  # the API deployment may land on any Ray pod
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["keys"] == "/etc/onspec/keys"
        vol = next(v for v in pod["volumes"] if v["name"] == "keys")
        paths = {i["path"] for s in vol["projected"]["sources"] for i in s["secret"]["items"]}
        assert paths == {"api-keys", "admin-keys"}
    # Keys are no chart values: setting them inline fails the values schema.
    r = subprocess.run([str(helm), "template", "r", str(ROOT / "helm" / "onspec"),
                        "--set", "onspec.server.api_keys[0]=sk-inline-0001"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0


# ---- the dashboard in a browser, with keys ----------------------------------------------------------------------
def test_dashboard_sends_the_key(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is missing (Debian package `chromium`)")
    cfg = keyed()
    app = create_app(cfg, ReplicaBackend(cfg, {"steps": 1}), registry=FakeRegistry(), history=History())
    with live(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium))
        try:
            # The key in the URL's fragment: every panel loads, and the key leaves the address bar.
            page = browser.new_page()
            page.goto(f"{url}/dashboard#key={ADMIN_KEY}&window=300")
            page.wait_for_function("document.getElementById('serving').textContent === 'base'", timeout=20_000)
            assert ADMIN_KEY not in page.url and "window=300" in page.url
            assert page.evaluate("sessionStorage.getItem('onspec-key')") == ADMIN_KEY
            page.wait_for_function("document.getElementById('updated').textContent.includes('history in memory')",
                                   timeout=20_000)
            assert "dashboard data" not in page.inner_text("#errors")
            # No key: the page asks once (an API key here) and then shows the charts; the admin panels say why not.
            page = browser.new_page()
            asked = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept(API_KEY)))
            page.goto(f"{url}/dashboard")
            page.wait_for_function("document.getElementById('updated').textContent.includes('history in memory')",
                                   timeout=20_000)
            page.wait_for_function("document.getElementById('registry').textContent.includes('admin scope')",
                                   timeout=20_000)
            assert len(asked) == 1 and "needs a key" in asked[0]
            assert page.inner_text("#serving") == "unknown"
        finally:
            browser.close()
