"""The dashboard in a real browser: headless Chromium (playwright) against a real server, uvicorn over create_app
with a real redis-server and the real engine (SmolLM2-135M-Instruct) behind an actors/replica.Replica that
follows the drafter registry like a Ray Serve engine replica does. Real requests, then the page: the acceptance
chart fills, the promote button and then the rollback button change the serving version, on the page and on the
replica, and a reload still shows the past (read back from Redis). The screenshot of the page at the end becomes
docs/dashboard.png when that file is missing (delete it to refresh the picture)."""
import contextlib
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from onspec.actors.hot_swap import DrafterWatcher
from onspec.actors.models import derive_drafter
from onspec.actors.registry import DrafterRegistry
from onspec.actors.replica import Replica
from onspec.cluster.api import create_app
from onspec.actors.config import OnspecConfig
from onspec.cluster.dashboard import History
from onspec.cluster.redis_server import RedisServer, free_port

from tests.conftest import REPO

pytestmark = pytest.mark.real_model
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: playwright's own browser download is never used
SCREENSHOT = REPO / "docs" / "dashboard.png"
PREFIX = "test:drafters"
HISTORY_KEY = "test:dashboard"
REQUESTS = [("chat", {"messages": [{"role": "user", "content": "Name three rivers in Europe."}]}),
            ("code", {"prompt": "def fibonacci(n):\n    "}),
            ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}], "stream": True}),
            ("code", {"prompt": "import numpy as np\n\ndef mean(xs):\n    "})]


class ReplicaBackend:
    """cluster/api/app.py's backend over a local Replica: what cluster/serve.HandleBackend does over Ray Serve."""

    def __init__(self, replica: Replica):
        self.replica = replica

    async def complete(self, req: dict) -> dict:
        return await self.replica.acomplete(req)

    async def stream(self, req: dict):
        async for ev in self.replica.astream(req):
            yield ev

    async def ready(self) -> dict:
        return await self.replica.aready()

    async def stats(self) -> dict:
        return self.replica.stats()


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def serving(app):
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def up():
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    try:
        wait_for(up, 30, "uvicorn")
        yield url
    finally:
        srv.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package `chromium`)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture()
def server(tmp_path, real_engine):
    """The app at a URL. Two real drafter versions: the engine's own derived one (the default kind's
    base version; rarely accepted), serving; and candidate ``v1``, the target itself run as a drafter
    (accepted nearly always, and no faster: an upper bound that makes promotions and rollbacks plain to see)."""
    redis_server = RedisServer(tmp_path / "redis").start()
    reg = DrafterRegistry.from_url(redis_server.url, tmp_path / "data", PREFIX)
    original, mode, dtype = real_engine.drafter, real_engine.spec.mode, real_engine.drafter_dtype
    source = real_engine.spec.source
    real_engine.drafter_dtype = "float32"  # v1 served as the target's own weights, not rounded again to 4 bits
    base = reg.ensure_registered(original)
    t = real_engine.target
    # v1 is of the truncated kind whatever the default: a swap across kinds and back.
    reg.register(derive_drafter(t, t.config.num_hidden_layers, t.config.vocab_size), parent=base,
                 version="v1")
    # Fixed-length drafts from the drafter model only: the cost model would (rightly) never draft with a
    # drafter as slow as the target, and hybrid would (rightly) take suffix drafts instead of its.
    real_engine.spec.mode, real_engine.spec.source = "fixed", "model"
    cfg = OnspecConfig(data_dir=tmp_path / "data").merged(**{"redis.url": redis_server.url,
                                                           "registry.prefix": PREFIX})
    replica = Replica(cfg, engine=real_engine, replica_id="replica-0")
    replica.watcher = DrafterWatcher(reg, real_engine, replica.replica_id, replica.load, poll_interval_s=0.2,
                                     apply=replica.apply_pending_swap).start()
    try:
        app = create_app(cfg, ReplicaBackend(replica), registry=reg,
                         history=History(lambda: reg.r, key=HISTORY_KEY, interval_s=1.0))
        with serving(app) as url:
            yield url, reg, base
    finally:
        replica.close()
        real_engine.apply_pending_swap()
        real_engine.drafter_dtype = dtype
        real_engine.set_drafter(original)  # the session's engine goes back as it was
        real_engine.spec.mode, real_engine.spec.source = mode, source
        reg.r.close()
        redis_server.stop()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)  # v1 is the size of the target


def generate(url: str, label: str, body: dict) -> httpx.Response:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {**body, "max_tokens": 24, "temperature": 0, "label": label,
            "stream_options": {"include_usage": True}}
    r = httpx.post(url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r


def wait_js(page, expr: str, timeout_s: float = 30):
    page.wait_for_function(expr, timeout=timeout_s * 1000)


def has_points(chart: str) -> str:
    return f"Number(document.querySelector('#{chart}').dataset.points || 0) > 0"


def replica_serves(version: str) -> str:
    return f"[...document.querySelectorAll('#replicas td.drafter')].some(td => td.textContent === '{version}')"


def acceptance(url: str) -> dict[str, float]:
    """Accepted / drafted per drafter version over the last 5 minutes, from the JSON the page draws."""
    sums: dict[str, list[int]] = {}
    for p in httpx.get(url + "/dashboard/data", params={"window_s": 300}).json()["points"]:
        s = sums.setdefault(p["version"], [0, 0])
        s[0], s[1] = s[0] + p["accepted"], s[1] + p["drafted"]
    return {v: a / d for v, (a, d) in sums.items() if d}


def click_and_confirm(page, selector: str) -> None:
    page.once("dialog", lambda d: d.accept())
    page.click(selector)


def test_dashboard_after_real_traffic_a_promotion_and_a_rollback(server, browser, tmp_path):
    url, reg, base = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/dashboard#window=300&rolling=60")
    for label, body in REQUESTS[:2]:
        generate(url, label, body)
    wait_js(page, has_points("chart-acc-version"))
    assert page.inner_text("#serving") == base

    # Promote v1 from its row in the registry table; the replica follows, and so does the page.
    click_and_confirm(page, "#registry tr[data-version='v1'] button.promote")
    wait_js(page, "document.querySelector('#serving').textContent === 'v1'")
    wait_js(page, replica_serves("v1"), 120)  # v1 is the size of the target: loading takes a while
    for label, body in REQUESTS[2:]:
        generate(url, label, body)
    wait_js(page, "document.querySelectorAll('#chart-acc-version g.ev.promote').length === 1 && "
                  "[...document.querySelectorAll('#chart-acc-version-legend span')].some(s => s.textContent === 'v1')")
    assert {p["label"] for p in httpx.get(url + "/dashboard/data").json()["points"]} == {"chat", "code"}

    # The past comes back from Redis after a reload (the flusher writes every second here).
    wait_for(lambda: reg.r.xlen(HISTORY_KEY) > 0, 30, "the history in Redis")
    page.reload()
    wait_js(page, has_points("chart-acc-label"))
    assert page.input_value("#window") == "300" and page.input_value("#rolling") == "60"  # kept in the URL

    click_and_confirm(page, "#rollback")
    wait_js(page, f"document.querySelector('#serving').textContent === '{base}'")
    assert f"{base} is now serving (was v1)" in page.inner_text("#message")
    assert reg.serving() == base and reg.history()[-1]["action"] == "rollback"
    assert page.locator("#registry tr[data-version='v1'] .status").inner_text() == "retired"
    wait_js(page, replica_serves(base))
    assert generate(url, "chat", REQUESTS[0][1]).json()["usage"]["drafter_version"] == base
    wait_js(page, "document.querySelectorAll('#chart-acc-version g.ev.rollback').length === 1")
    acc = acceptance(url)
    assert acc["v1"] > 0.9 and acc["v1"] > acc[base], acc  # the target as its own drafter
    assert not errors, errors
    wait_js(page, "document.querySelector('#summary .tile .v').textContent === '5'")  # the last request is in
    shot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    if not SCREENSHOT.exists():  # the committed picture changes only when deleted first: runs leave no diff
        shutil.copy(shot, SCREENSHOT)
