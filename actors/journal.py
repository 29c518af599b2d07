"""The trainer's consumption journal: an append-only file saying, for every stream record the trainer consumed,
what it did with it, written *before* the record is acknowledged (XACK). Off by default; the fault benches and
tests (cluster/bench/chaos.py) turn it on to check, across trainer crashes and restarts, that every record the
consumer group acknowledged was really used (docs/reliability.md).

One JSON object a line: ``{"i": incarnation, "e": event, "ids": [stream ids], "t": unix time}``. Events:

  begin      a training step starts on these fresh records (nothing acknowledged yet)
  applied    the optimizer step that used them was applied; the XACK follows
  held       they joined the held-back slice of the promotion gate (acknowledged without training, by design)
  skipped    trimmed while pending, or an unknown schema version (acknowledged, counted)
  malformed  could not be decoded or failed validation (acknowledged, counted)

``incarnation`` is the writing process's pid and start time: a trainer restarted by Ray writes under a new one.
Each line is written with one ``write`` of a line-buffered file, so a SIGKILL can at worst cut the last line
short, and ``read_journal`` skips such a line.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

EVENTS = ("begin", "applied", "held", "skipped", "malformed")
CONSUMED = ("applied", "held", "skipped", "malformed")  # what may precede an XACK


class TrainingJournal:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.incarnation = f"{os.getpid()}-{int(time.time() * 1000)}"
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, ids) -> None:
        ids = [i for i in ids if i]
        if not ids:
            return
        line = json.dumps({"i": self.incarnation, "e": event, "ids": ids, "t": round(time.time(), 3)}) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_journal(path: Path | str) -> list[dict]:
    """The journal's entries in order; a line cut short by a crash is skipped."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("e") in EVENTS:
            out.append(entry)
    return out


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def audit(entries: list[dict], stream_ids: list[str], pending_ids: set[str], last_delivered: str) -> dict:
    """Check the consumer group against the journal.

    ``stream_ids``: the ids now in the stream; ``pending_ids``: the group's pending entries (XPENDING);
    ``last_delivered``: the group's last-delivered-id. An id up to it that is not pending was acknowledged; it is
    **lost** if no incarnation of the trainer journalled it as applied, held, skipped or malformed. Records
    *re-applied* are those applied by more than one step (a crash between a step and its XACK: the record comes
    back and is trained on once more)."""
    consumed: dict[str, Counter] = {e: Counter() for e in EVENTS}
    by_incarnation: dict[str, list[str]] = {}
    for entry in entries:
        consumed[entry["e"]].update(entry["ids"])
        by_incarnation.setdefault(entry["i"], []).append(entry["e"])
    used = set()
    for e in CONSUMED:
        used.update(consumed[e])
    last = _id_key(last_delivered)
    delivered = [i for i in stream_ids if _id_key(i) <= last]
    acked = [i for i in delivered if i not in pending_ids]
    lost = [i for i in acked if i not in used]
    return {
        "stream_records": len(stream_ids), "delivered": len(delivered), "acked": len(acked),
        "pending": len(pending_ids), "undelivered": len(stream_ids) - len(delivered),
        "applied": len(consumed["applied"]), "held": len(consumed["held"]), "skipped": len(consumed["skipped"]),
        "malformed": len(consumed["malformed"]),
        "reapplied": sum(1 for n in consumed["applied"].values() if n > 1),
        "records_lost": len(lost), "lost_ids": lost[:10],
        "incarnations": len(by_incarnation),
        # An incarnation whose last word is "begin" died inside a training step.
        "died_mid_step": sum(1 for ev in by_incarnation.values() if ev and ev[-1] == "begin"),
    }
