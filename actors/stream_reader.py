"""The trainer's side of the rejection stream: reading records with a consumer group (XREADGROUP, XAUTOCLAIM,
XACK through redis-py) and checking each one before it can reach a training step."""
from __future__ import annotations

import math
import struct

import redis

from onspec.actors.stream_logger import SCHEMA_VERSION, decode_record


class MalformedRecord(ValueError):
    """A stream entry the trainer cannot use: a field missing, undecodable or out of range."""


def parse_record(fields: dict, vocab_size: int, max_len: int) -> dict | None:
    """``decode_record`` plus the checks that keep a bad entry from reaching a training step: None for a schema
    version this trainer does not know (skip it), MalformedRecord for a broken entry (non-integer numbers,
    packed arrays cut short, token ids outside the vocabulary, a window longer than the model takes, ...)."""
    raw = fields.get(b"schema_version", fields.get("schema_version"))
    try:
        version = int(raw)
    except (TypeError, ValueError):
        raise MalformedRecord(f"schema_version is {raw!r}, not an integer") from None
    if version != SCHEMA_VERSION:
        return None
    try:
        rec = decode_record(fields)
    except KeyError as e:
        raise MalformedRecord(f"missing field {e}") from None
    except (ValueError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise MalformedRecord(f"undecodable field: {type(e).__name__}: {e}") from None
    for key in ("context", "drafts", "topk_ids", "topk_logprobs"):
        b = fields.get(key.encode(), fields.get(key))
        if len(b) % 4:
            raise MalformedRecord(f"{key} is {len(b)} bytes, not a whole number of 4-byte values (truncated)")
    ctx, drafts, n, tgt = rec["context"], rec["drafts"], rec["rejected_pos"], rec["target_token"]
    if not ctx:
        raise MalformedRecord("empty context")
    if not 0 <= n <= len(drafts):
        raise MalformedRecord(f"rejected_pos {n} outside 0..{len(drafts)}")
    if len(ctx) + n + 1 > max_len:
        raise MalformedRecord(f"window of {len(ctx) + n + 1} tokens exceeds the model's {max_len}")
    if not 0 <= tgt < vocab_size or max(ctx + drafts[:n]) >= vocab_size:
        raise MalformedRecord(f"token id outside the vocabulary (size {vocab_size})")
    if not math.isfinite(rec["temperature"]) or rec["temperature"] < 0:
        raise MalformedRecord(f"temperature {rec['temperature']!r}")
    return rec


class StreamReader:
    """The trainer's side of the rejection stream: XREADGROUP / XACK / XAUTOCLAIM (redis-py streams)."""

    def __init__(self, client: redis.Redis, key: str, group: str, consumer: str, claim_idle_ms: int = 60_000,
                 count: int = 64):
        self.r, self.key, self.group, self.consumer = client, key, group, consumer
        self.claim_idle_ms, self.count = claim_idle_ms, count
        self._own_cursor: str | None = "0"  # re-read our own pending records first (None: done)
        self._claim_cursor = "0-0"
        self.claimed = 0

    def ensure_group(self) -> None:
        try:
            # id 0: a new group starts at the stream's beginning (records written before the trainer started).
            self.r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, block_ms: int | None = None) -> list[tuple[str, dict | None]]:
        """The next records for this consumer: its own pending ones (after a restart), then records claimed
        from consumers idle for ``claim_idle_ms``, then new ones (waiting up to ``block_ms``)."""
        if self._own_cursor is not None:
            got = self._entries(self.r.xreadgroup(self.group, self.consumer, {self.key: self._own_cursor},
                                                  count=self.count))
            if got:
                self._own_cursor = got[-1][0]
                return got
            self._own_cursor = None
        res = self.r.xautoclaim(self.key, self.group, self.consumer, self.claim_idle_ms,
                                start_id=self._claim_cursor, count=self.count)
        self._claim_cursor = _text(res[0])
        claimed = [(_text(i), f or None) for i, f in res[1]]
        if claimed:
            self.claimed += len(claimed)
            return claimed
        return self._entries(self.r.xreadgroup(self.group, self.consumer, {self.key: ">"}, count=self.count,
                                               block=block_ms))

    @staticmethod
    def _entries(resp) -> list[tuple[str, dict | None]]:
        out = []
        for _, entries in resp or []:
            out.extend((_text(i), f or None) for i, f in entries)
        return out

    def ack(self, ids: list[str]) -> int:
        return int(self.r.xack(self.key, self.group, *ids)) if ids else 0

    def pending(self) -> int:
        return int(self.r.xpending(self.key, self.group)["pending"])


def stream_ms(rid: str | None) -> int | None:
    """The millisecond timestamp a Redis stream id ("<ms>-<seq>") starts with; None for anything else."""
    try:
        return int(rid.split("-")[0])
    except (AttributeError, ValueError):
        return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
