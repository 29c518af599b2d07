"""Replicas share the suffix index's input (finished requests' prompt + output token ids) through a Redis stream.

Each replica keeps its own index (a lookup per round must not cost a network round trip) and rebuilds it from
this stream: it publishes every finished request and indexes everyone else's; a new or restarted replica warms
up from the last ``stream_maxlen`` entries. A dedicated stream rather than the rejection stream, because the
index needs whole sequences and the rejection stream holds 128-token windows of some rounds only. Token ids
only, no text, like the rejection stream (docs/stream_schema.md).

The decoding thread never waits on Redis: ``publish`` appends to a bounded buffer, and one background thread
writes it and reads the others' entries, handing them to ``deliver`` (the engine's inbox).
"""
from __future__ import annotations

import collections
import struct
import threading
from typing import Callable

import redis

from onspec.actors.suffix_index import SuffixIndex
from onspec.actors.config import SuffixConfig

SHARE_VERSION = 1


def encode_sequence(tokens: list[int], replica_id: str) -> dict:
    return {"v": SHARE_VERSION, "replica": replica_id, "tokens": struct.pack(f"<{len(tokens)}I", *tokens)}


def decode_sequence(fields: dict) -> tuple[str, list[int]] | None:
    """(replica id, token ids), or None for an entry this version cannot read."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        if int(f["v"]) != SHARE_VERSION:
            return None
        b = f["tokens"]
        if len(b) % 4:
            return None
        rid = f["replica"].decode() if isinstance(f["replica"], bytes) else str(f["replica"])
        return rid, list(struct.unpack(f"<{len(b) // 4}I", b))
    except (KeyError, ValueError, TypeError, struct.error):
        return None


class SuffixSharer:
    def __init__(self, client: redis.Redis, cfg: SuffixConfig, replica_id: str,
                 deliver: Callable[[list[int]], None], buffer_size: int = 256, block_ms: int = 500):
        self.client, self.cfg, self.replica_id, self.deliver = client, cfg, replica_id, deliver
        self.block_ms = block_ms
        self._out: collections.deque[list[int]] = collections.deque(maxlen=buffer_size)
        self._stop = threading.Event()
        self._last_id: str | None = None
        self.published = self.received = self.errors = 0
        self._thread = threading.Thread(target=self._run, name="onspec-suffix-share", daemon=True)

    @classmethod
    def from_config(cls, url: str, cfg: SuffixConfig, replica_id: str, deliver, timeout_s: float = 2.0):
        # The socket timeout must outlast a blocking XREAD.
        client = redis.Redis.from_url(url, socket_timeout=timeout_s + 1.0, socket_connect_timeout=timeout_s)
        return cls(client, cfg, replica_id, deliver)

    def start(self) -> "SuffixSharer":
        self._thread.start()
        return self

    def publish(self, tokens: list[int]) -> None:
        """From the decoding thread: a buffer append (the oldest are dropped if Redis stays away)."""
        self._out.append(list(tokens))

    def stats(self) -> dict:
        return {"published": self.published, "received": self.received, "errors": self.errors,
                "pending": len(self._out)}

    # ---- the background thread ------------------------------------------------------------------------------
    def _warm_up(self) -> None:
        entries = self.client.xrevrange(self.cfg.stream_key, count=self.cfg.stream_maxlen)
        self._last_id = entries[0][0].decode() if entries else "0-0"
        for _, fields in reversed(entries):  # oldest first: the index evicts oldest first
            self._take(fields, own_too=True)  # an earlier life of this replica had another id anyway

    def _take(self, fields: dict, own_too: bool = False) -> None:
        seq = decode_sequence(fields)
        if seq is None:
            return
        rid, tokens = seq
        if own_too or rid != self.replica_id:
            self.deliver(tokens)
            self.received += 1

    def _write(self) -> None:
        batch = []
        while self._out:
            batch.append(self._out.popleft())
        if not batch:
            return
        pipe = self.client.pipeline(transaction=False)
        for tokens in batch:
            pipe.xadd(self.cfg.stream_key, encode_sequence(tokens, self.replica_id),
                      maxlen=self.cfg.stream_maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError:
            for tokens in reversed(batch):  # back to the front, in order, for the next attempt
                self._out.appendleft(tokens)
            raise
        self.published += len(batch)

    def _read(self) -> None:
        resp = self.client.xread({self.cfg.stream_key: self._last_id}, count=64, block=self.block_ms)
        for _, entries in resp or []:
            for entry_id, fields in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                self._take(fields)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if self._last_id is None:
                    self._warm_up()
                self._write()
                self._read()
                backoff = 0.2
            except redis.RedisError:
                self.errors += 1
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self._write()  # what is still buffered, best effort
        except redis.RedisError:
            pass


def load_index(client: redis.Redis, cfg: SuffixConfig) -> SuffixIndex:
    """An index of everything the shared stream holds now (what a replica starting now would warm up with)."""
    index = SuffixIndex(cfg.index_tokens, cfg.max_depth)
    for _, fields in reversed(client.xrevrange(cfg.stream_key, count=cfg.stream_maxlen)):
        seq = decode_sequence(fields)
        if seq is not None:
            index.add(seq[1])
    return index
