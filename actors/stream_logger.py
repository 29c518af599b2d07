"""Rejection records to a Redis stream, off the request's critical path.

``StreamLogger.log`` only appends to a bounded in-memory buffer; a background thread encodes what is there and
writes it with pipelined ``XADD key MAXLEN ~ N`` batches. When Redis is down or slow the records wait in the
buffer (the oldest are dropped, and counted, once it is full) and the thread retries with backoff: redis-py
reconnects on the next command, so a returning server is picked up without any help.

The record layout is docs/stream_schema.md; ``encode_record`` / ``decode_record`` are its reference code.
"""
from __future__ import annotations

import collections
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from onspec.actors.config import OnspecConfig

SCHEMA_VERSION = 1


# ---- the record schema --------------------------------------------------------------------------------------
def _u32(ids) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def _f32(xs) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


def encode_record(rec, label: str, ts: float, request_id: str = "") -> dict[str, Any]:
    """A RoundRecord (actors/engine.py) as the flat field map XADD writes: numbers as decimal strings, token
    ids as packed little-endian uint32, log-probabilities as packed little-endian float32. No text."""
    return {
        "schema_version": SCHEMA_VERSION,
        "ts_ms": int(ts * 1000),
        "label": label or "",
        "request_id": request_id or "",
        "drafter_version": rec.drafter_version or "",
        "context": _u32(rec.context),
        "drafts": _u32(rec.drafts),
        "rejected_pos": rec.accepted,
        "target_token": rec.target_token,
        "topk_ids": _u32(rec.topk_ids),
        "topk_logprobs": _f32(rec.topk_logprobs),
        "temperature": repr(float(getattr(rec, "temperature", 0.0))),
        "source": getattr(rec, "source", "model"),
        "constrained": "1" if getattr(rec, "constrained", False) else "0",
    }


def decode_record(fields: dict) -> dict[str, Any]:
    """Fields read back from Redis (bytes keys and values) as plain Python values."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}

    def ids(key):
        b = f[key]
        return list(struct.unpack(f"<{len(b) // 4}I", b))

    def text(key):
        v = f[key]
        return v.decode() if isinstance(v, bytes) else str(v)

    lp = f["topk_logprobs"]
    return {
        "schema_version": int(f["schema_version"]), "ts_ms": int(f["ts_ms"]), "label": text("label"),
        "request_id": text("request_id"), "drafter_version": text("drafter_version"),
        "context": ids("context"), "drafts": ids("drafts"), "rejected_pos": int(f["rejected_pos"]),
        "target_token": int(f["target_token"]), "topk_ids": ids("topk_ids"),
        "topk_logprobs": list(struct.unpack(f"<{len(lp) // 4}f", lp)),
        # Added within schema 1 as an optional field: records written before it count as greedy.
        "temperature": float(text("temperature")) if "temperature" in f else 0.0,
        "source": text("source") if "source" in f else "model",
        "constrained": text("constrained") == "1" if "constrained" in f else False,
    }


# ---- the logger ---------------------------------------------------------------------------------------------
@dataclass
class LoggerStats:
    written: int = 0        # records Redis acknowledged
    dropped: int = 0        # records thrown away because the buffer was full
    errors: int = 0         # failed write attempts
    pending: int = 0        # records waiting in the buffer
    connected: bool = False  # did the last write attempt reach Redis?
    cpu_s: float = 0.0      # CPU time of the writer thread (encoding, redis-py): its cost to serving

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StreamLogger:
    def __init__(self, url: str, stream_key: str, maxlen: int = 100_000, buffer_size: int = 10_000,
                 batch_size: int = 256, flush_interval_s: float = 0.05, socket_timeout_s: float = 2.0,
                 reconnect_backoff_s: float = 0.2, encode: Callable[[Any], dict] | None = None):
        self.url, self.stream_key, self.maxlen = url, stream_key, maxlen
        self.buffer_size, self.batch_size = buffer_size, batch_size
        self.flush_interval_s, self.reconnect_backoff_s = flush_interval_s, reconnect_backoff_s
        self.encode = encode or (lambda item: item)
        # Short timeouts: a hung Redis must not pin the writer thread for long (requests never wait on it).
        self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s)
        self._buf: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight = 0
        self._stats = LoggerStats()
        self._thread = threading.Thread(target=self._run, name="onspec-stream-logger", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: OnspecConfig, url: str | None = None,
                    encode: Callable[[Any], dict] | None = None) -> "StreamLogger":
        r = cfg.redis
        if not (url or r.url):
            raise ValueError("the stream logger needs a Redis URL (start the private server first)")
        return cls(url or r.url, r.stream_key, r.maxlen, r.buffer_size, r.batch_size, r.flush_interval_s,
                   r.socket_timeout_s, r.reconnect_backoff_s, encode)

    # ---- the request side: never blocks on Redis --------------------------------------------------------
    def log(self, item: Any) -> None:
        with self._lock:
            if len(self._buf) >= self.buffer_size:
                self._buf.popleft()  # the oldest go first: fresh rejections teach the drafter more
                self._stats.dropped += 1
            self._buf.append(item)
            full = len(self._buf) >= self.batch_size
        if full:
            self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            self._stats.pending = len(self._buf) + self._inflight
            return self._stats.as_dict()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far is written (or the timeout passes); True if it was."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if self.stats()["pending"] == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (for at most ``timeout`` seconds), then stop the thread."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.client.close()

    # ---- the writer thread --------------------------------------------------------------------------------
    def _take(self) -> list:
        with self._lock:
            n = min(self.batch_size, len(self._buf))
            batch = [self._buf.popleft() for _ in range(n)]
            self._inflight = n
            return batch

    def _give_back(self, batch: list) -> None:
        """A failed batch goes back to the front, as far as the buffer has room; the rest counts as dropped."""
        with self._lock:
            room = max(0, self.buffer_size - len(self._buf))
            keep = batch[len(batch) - room:] if room < len(batch) else batch
            self._stats.dropped += len(batch) - len(keep)
            self._buf.extendleft(reversed(keep))
            self._inflight = 0

    def _write(self, batch: list) -> None:
        pipe = self.client.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(self.stream_key, self.encode(item), maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def _run(self) -> None:
        backoff = self.reconnect_backoff_s
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            cpu0 = time.thread_time()
            backoff = self._drain(backoff)
            with self._lock:
                self._stats.cpu_s += time.thread_time() - cpu0
            if backoff is None:
                return

    def _drain(self, backoff: float) -> float | None:
        """Write batches until the buffer is empty or a write fails; the next backoff (None: stop now)."""
        while True:
            batch = self._take()
            if not batch:
                break
            try:
                self._write(batch)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._give_back(batch)
                with self._lock:
                    self._stats.errors += 1
                    self._stats.connected = False
                if self._stop.wait(backoff):
                    return None
                return min(backoff * 2, 5.0)
            except redis.RedisError:
                # The server refused the batch itself (e.g. OOM): retrying the same records will not help.
                with self._lock:
                    self._stats.errors += 1
                    self._stats.dropped += len(batch)
                    self._inflight = 0
                continue
            with self._lock:
                self._stats.written += len(batch)
                self._stats.connected = True
                self._inflight = 0
            backoff = self.reconnect_backoff_s
        return backoff

    def ping(self) -> bool:
        """Is Redis reachable now? (Blocks up to the socket timeout: call it off the event loop.)"""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False
