"""Bad entries in the rejection stream, written with real XADDs to a real redis-server: the trainer's own loop
reads them next to good ones, skips and acknowledges them (so they never come back), counts them, journals
them, and trains on the good ones without crashing."""
import struct
import threading
import time

import pytest
import redis
from onspec.actors.journal import TrainingJournal, read_journal
from onspec.actors.stream_logger import encode_record
from onspec.actors.stream_reader import MalformedRecord, parse_record

from tests.test_trainer import GROUP, KEY, _records, _trainer


@pytest.fixture()
def client(module_redis_server):
    c = redis.Redis.from_url(module_redis_server.url)
    c.flushall()
    return c


def _good(i=0):
    return encode_record(_records(1, seed=i)[0], "ok", 1.0, f"good-{i}")


def _bad_entries():
    g = _good()

    def but(**changes):
        rec = {k: v for k, v in g.items() if changes.get(k, "") is not None}
        rec.update({k: v for k, v in changes.items() if v is not None})
        return rec

    return {
        "non-integer schema": but(schema_version="one"),
        "no schema": but(schema_version=None),
        "context cut short": but(context=g["context"][:-3]),
        "logprobs cut short": but(topk_logprobs=g["topk_logprobs"][:5]),
        "no target_token": but(target_token=None),
        "no context": but(context=None),
        "non-integer rejected_pos": but(rejected_pos="2.5"),
        "rejected_pos past the drafts": but(rejected_pos=9),
        "negative target": but(target_token=-4),
        "token outside the vocabulary": but(context=struct.pack("<3I", 1, 2, 100_000)),
        "empty context": but(context=b""),
        "window too long": but(context=struct.pack("<3000I", *([1] * 3000))),
        "nan temperature": but(temperature="nan"),
        "negative temperature": but(temperature="-1"),
        "bad utf-8 label": but(label=b"\xff\xfe"),
        "garbage": {"hello": "world"},
    }


def test_parse_record_says_what_is_wrong():
    bad = _bad_entries()
    assert parse_record(_good(), 96, 2048)["target_token"] >= 0
    assert parse_record({**_good(), "schema_version": 2}, 96, 2048) is None  # unknown version: skipped
    with pytest.raises(MalformedRecord, match="truncated|4-byte|undecodable"):
        parse_record(bad["context cut short"], 96, 2048)
    with pytest.raises(MalformedRecord, match="vocabulary"):
        parse_record(bad["token outside the vocabulary"], 96, 2048)
    with pytest.raises(MalformedRecord, match="schema_version"):
        parse_record(bad["garbage"], 96, 2048)


def test_the_trainer_loop_skips_counts_and_acknowledges_malformed_records(client, tmp_path):
    bad = _bad_entries()
    ids = {"good": [], "bad": [], "unknown": []}
    for i, (name, fields) in enumerate(bad.items()):
        ids["good"].append(client.xadd(KEY, _good(i)).decode())
        ids["bad"].append(client.xadd(KEY, fields).decode())
    ids["unknown"].append(client.xadd(KEY, {**_good(99), "schema_version": 2}).decode())
    ids["good"].append(client.xadd(KEY, _good(100)).decode())
    total = sum(len(v) for v in ids.values())

    tr = _trainer(client, tmp_path, holdout_percent=1, onpolicy=False, yield_to_serving=False)
    tr.journal = TrainingJournal(tmp_path / "journal.jsonl")
    stop = threading.Event()
    loop = threading.Thread(target=tr.run, args=(stop,), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while tr.stats.records_acked < total and time.monotonic() < deadline and loop.is_alive():
            time.sleep(0.05)
        assert loop.is_alive(), "the trainer loop died on a malformed record"
    finally:
        stop.set()
        loop.join(30)
    s = tr.stats
    assert s.records_acked == total and client.xpending(KEY, GROUP)["pending"] == 0
    assert s.records_malformed == len(ids["bad"]) and s.records_skipped == len(ids["unknown"])
    assert s.last_malformed and s.record_steps >= 1
    used = {w.record_id for w in tr.holdout} | {w.record_id for _, w in tr.replay}
    assert used == set(ids["good"])  # every good record trained on (or held back), no bad one
    journal = read_journal(tmp_path / "journal.jsonl")
    assert {i for e in journal if e["e"] == "malformed" for i in e["ids"]} == set(ids["bad"])
    assert {i for e in journal if e["e"] == "skipped" for i in e["ids"]} == set(ids["unknown"])
    assert tr.state()["records_malformed"] == len(ids["bad"])
