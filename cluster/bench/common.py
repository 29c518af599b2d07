"""What the benches share: percentiles, the request a prompt makes, polling with a deadline, closed-loop HTTP
traffic that classifies every outcome, and a private cluster for benches that break or soak it."""
from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 for no samples)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def request_for(spec: PromptSpec, **body) -> tuple[str, dict]:
    """The endpoint and body a prompt makes: chat messages go to /v1/chat/completions, text to /v1/completions."""
    if spec.messages is not None:
        return "/v1/chat/completions", {**body, "messages": spec.messages}
    return "/v1/completions", {**body, "prompt": spec.prompt}


class WaitTimeout(RuntimeError):
    """What a bench waited for did not happen in time (the service did not recover): a finding, not a crash."""


def wait_for(pred: Callable[[], object], timeout: float, every: float = 0.2, what: str = "") -> object:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes (WaitTimeout)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = pred()
        except Exception as e:  # noqa: BLE001 -- a probe that fails (a process restarting) is just "not yet"
            value, last_error = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            why = f" (last probe error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what or pred}{why}")
        time.sleep(every)


# ---- closed-loop traffic ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    t0: float
    t1: float
    outcome: str  # completed | failed | failed_unclear | hung
    error: str = ""
    stream: bool = False
    usage: dict | None = None


class Load:
    """Closed-loop clients over HTTP: each sends its next request as soon as the previous one ends. Every second
    request streams. A request that has not finished after ``timeout_s`` is abandoned and counted as hung."""

    def __init__(self, url: str, model: str, specs: list[PromptSpec], clients: int = 3, max_tokens: int = 16,
                 timeout_s: float = 120.0, label: str = "chaos", seed: int = 0, api_key: str | None = None):
        self.url, self.model, self.specs = url.rstrip("/"), model, specs
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_tokens, self.timeout_s, self.label = max_tokens, timeout_s, label
        self.results: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed + i,), daemon=True,
                                          name=f"chaos-client-{i}") for i in range(clients)]

    # -- one request --
    def _body(self, spec: PromptSpec, stream: bool) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "label": self.label,
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return request_for(spec, **body)

    @staticmethod
    def _error_of(r: httpx.Response) -> tuple[str, str]:
        try:
            msg = r.json()["error"]["message"]
            return "failed", f"HTTP {r.status_code}: {msg}"
        except Exception:  # noqa: BLE001 -- not an OpenAI error body
            return "failed_unclear", f"HTTP {r.status_code}: {r.text[:120]!r}"

    def request(self, client: httpx.Client, spec: PromptSpec, stream: bool) -> Outcome:
        path, body = self._body(spec, stream)
        t0 = time.time()
        try:
            if not stream:
                r = client.post(self.url + path, json=body)
                if r.status_code != 200:
                    return Outcome(t0, time.time(), *self._error_of(r))
                return Outcome(t0, time.time(), "completed", usage=r.json().get("usage"))
            with client.stream("POST", self.url + path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return Outcome(t0, time.time(), *self._error_of(r), stream=True)
                usage, error, done = None, None, False
                for line in r.iter_lines():
                    if time.time() - t0 > self.timeout_s:
                        return Outcome(t0, time.time(), "hung", "stream still running at the timeout", True)
                    if line == "data: [DONE]":
                        done = True
                        break
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = chunk["error"].get("message") or "error event"
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                if error:
                    return Outcome(t0, time.time(), "failed", f"in-stream error: {error}", True)
                if not done or usage is None:
                    return Outcome(t0, time.time(), "failed_unclear", "stream ended without [DONE]", True)
                return Outcome(t0, time.time(), "completed", stream=True, usage=usage)
        except httpx.TimeoutException as e:
            return Outcome(t0, time.time(), "hung", f"{type(e).__name__} after {self.timeout_s:.0f} s", stream)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return Outcome(t0, time.time(), "failed_unclear", f"{type(e).__name__}: {e}", stream)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=10.0), headers=self.headers) as client:
            n = seed
            while not self._stop.is_set():
                res = self.request(client, rng.choice(self.specs), stream=n % 2 == 0)
                n += 1
                with self._lock:
                    self.results.append(res)

    # -- control --
    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """No new requests; the ones in flight finish (or reach their timeout)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 30)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.results)

    def count(self, outcome: str = "completed", after: float = 0.0) -> int:
        return sum(1 for r in self.snapshot() if r.outcome == outcome and r.t1 >= after)

    def wait(self, pred: Callable[[Load], bool], timeout: float, what: str) -> None:
        wait_for(lambda: pred(self), timeout, 0.1, what)

    def summary(self) -> dict:
        rows = self.snapshot()
        out = {"sent": len(rows)}
        for k in ("completed", "failed", "failed_unclear", "hung"):
            out[k] = sum(1 for r in rows if r.outcome == k)
        out["failed"] += out.pop("failed_unclear")
        out["failed_unclear"] = sum(1 for r in rows if r.outcome == "failed_unclear")
        errors: dict[str, int] = {}
        for r in rows:
            if r.error:
                errors[r.error[:160]] = errors.get(r.error[:160], 0) + 1
        out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
        lat = sorted(r.t1 - r.t0 for r in rows if r.outcome == "completed")
        out["latency_max_s"] = round(lat[-1], 2) if lat else None
        return out


# ---- a private cluster ---------------------------------------------------------------------------------------
def first_api_key(cfg: OnspecConfig) -> str | None:
    """A key the load can send, when the configuration has any (admin keys work on the inference API too)."""
    keys = getattr(cfg.server, "keys", None)
    if keys is None:
        return None
    api, admin = keys()
    return (api + admin or [None])[0]


def chaos_config(cfg: OnspecConfig, work: Path, replicas: int, port: int | None = None,
                 coverage_every: int = 8) -> OnspecConfig:
    """The cluster the chaos bench breaks: its own data dir (the converted model linked in) and redis-server,
    never the user's."""
    from onspec.cluster.redis_server import free_port

    src = Path(cfg.data_dir).resolve()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    if (src / "models").exists() and not (data / "models").exists():
        (data / "models").symlink_to(src / "models")
    return cfg.merged(**{
        "data_dir": str(data), "redis.dir": str(work / "redis"), "redis.url": None, "redis.port": 0,
        "server.port": port or free_port(), "server.replicas": replicas, "server.ray_address": None,
        "stream.enabled": True, "trainer.enabled": True, "registry.poll_interval_s": 0.5,
        # Short requests and a drafter the cost model may stop using: a coverage record every few tokens keeps
        # records flowing, so that every scenario has a stream to lose.
        "stream.coverage_every": coverage_every,
    })


def start_chaos_cluster(cfg: OnspecConfig, work: Path, replicas: int = 2, port: int | None = None,
                        coverage_every: int = 8):
    from onspec.cluster.serve import Cluster

    journal = work / "trainer-journal.jsonl"
    cluster = Cluster(chaos_config(cfg, work, replicas, port, coverage_every),
                      trainer_journal=str(journal)).start()
    return cluster, journal
