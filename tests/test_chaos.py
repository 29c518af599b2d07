"""Faults on the real processes of one running cluster (real Ray Serve with 1 engine replica, the real model, the
trainer actor with its journal, a private real redis-server), each under closed-loop HTTP traffic: a tampered
checkpoint, redis-server killed and restarted, the trainer killed inside a step, the engine replica killed. The
scenarios are cluster/bench/chaos.py's, with small sizes: each checks what the consumer group acknowledged so far
against the trainer's journal (records_lost), and the last test drains the stream and checks all of it. Cheaper
checks of the same mechanisms (the audit, the watcher's refusal) come first. One cluster, ~2 min on a quiet
2-core machine."""
import os
import json
import logging

import httpx
import psutil
import pytest
import redis
from onspec.actors.checkpoint import WEIGHTS
from onspec.actors.hot_swap import DrafterWatcher
from onspec.actors.journal import TrainingJournal, audit, read_journal
from onspec.actors.registry import DrafterRegistry
from onspec.cluster.bench import chaos as bc
from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import packaged_prompts, read_prompts

from tests.conftest import DATA_DIR, tiny_drafter, tiny_target


# ---- no cluster: the journal audit and the watcher's refusal ------------------------------------------------
def test_audit_finds_an_acknowledged_record_nobody_used(tmp_path):
    j = TrainingJournal(tmp_path / "j.jsonl")
    j.write("begin", ["1-0", "2-0"])
    j.write("applied", ["1-0", "2-0"])
    j.write("held", ["3-0"])
    j.write("begin", ["4-0"])  # then the process dies: 4-0 stays pending
    second = TrainingJournal(tmp_path / "j.jsonl")
    second.incarnation = "restarted"  # another process, in real life
    second.write("applied", ["2-0", "4-0"])  # 2-0: applied, killed before its XACK, applied again
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"i": "x", "e": "appl')  # a line cut short by SIGKILL
    entries = read_journal(tmp_path / "j.jsonl")
    assert len(entries) == 5
    ids = ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"]
    ok = audit(entries, ids, pending_ids=set(), last_delivered="4-0")
    assert ok["records_lost"] == 0 and ok["reapplied"] == 1 and ok["undelivered"] == 2
    assert ok["incarnations"] == 2 and ok["died_mid_step"] == 1
    # 5-0 delivered and acknowledged (not pending) but never journalled: lost; 6-0 pending: not (yet) lost.
    bad = audit(entries, ids, pending_ids={"6-0"}, last_delivered="6-0")
    assert bad["records_lost"] == 1 and bad["lost_ids"] == ["5-0"] and bad["pending"] == 1


@pytest.mark.parametrize("mode", ["overwrite", "truncate"])
def test_watcher_refuses_tampered_weights_and_keeps_its_drafter(redis_server, tmp_path, caplog, mode):
    target = tiny_target()
    registry = DrafterRegistry(redis.Redis.from_url(redis_server.url), tmp_path)
    base = tiny_drafter(target)
    registry.ensure_registered(base)
    version = registry.register(tiny_drafter(target, bump=0.5), parent="base")["version"]
    bc.tamper(tmp_path / "drafters" / version / WEIGHTS, mode)  # after registration, before any load
    registry.promote(version, reason="test: tampered")

    class Engine:
        def __init__(self):
            self.target, self.drafter, self._next_drafter = target, base, None

        def swap_drafter(self, d):
            self._next_drafter = d

    engine = Engine()
    watcher = DrafterWatcher(registry, engine, "r1", lambda: {"in_flight": 0})
    with caplog.at_level(logging.ERROR, logger="onspec.hot_swap"):
        assert watcher.check_once() is None
        assert watcher.check_once() is None  # not retried, not counted twice
    assert engine._next_drafter is None and watcher.current() == "base"
    assert watcher.refused == 1 and "sha256" in watcher.failed[version]
    assert any(version in r.getMessage() and "keeping base" in r.getMessage() for r in caplog.records)
    fixed = registry.register(tiny_drafter(target, bump=0.25), parent="base")["version"]
    registry.promote(fixed, reason="test: a sound version after the tampered one")
    assert watcher.check_once() == fixed and engine._next_drafter.version == fixed


def test_a_trainer_does_not_claim_back_and_retrain_records_it_still_holds(redis_server, tmp_path):
    """XAUTOCLAIM hands back every record idle for claim_idle_ms, the trainer's own too: a record waiting in its
    fresh queue that long must not be queued, trained on and journalled a second time."""
    from tests.test_trainer import GROUP, KEY, _records, _trainer, _write

    client = redis.Redis.from_url(redis_server.url)
    ids = _write(client, _records(6))
    tr = _trainer(client, tmp_path, claim_idle_ms=0, holdout_percent=1)
    tr.journal = TrainingJournal(tmp_path / "j.jsonl")
    tr.poll()
    tr.poll()  # everything it holds is idle for >= 0 ms now: claimed back, and must be dropped
    queued = [w.record_id for w in tr.fresh] + [w.record_id for w in tr.holdout]
    assert sorted(queued) == sorted(ids)
    while tr.step_records():
        tr.poll()
    st = audit(read_journal(tmp_path / "j.jsonl"), ids, set(), ids[-1])
    assert st["reapplied"] == 0 and st["records_lost"] == 0 and st["acked"] == 6
    assert client.xpending(KEY, GROUP)["pending"] == 0


# ---- the real cluster ---------------------------------------------------------------------------------------

def _ours(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "redis-server" in cmd or "ray" in cmd


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    # The four faults on a real cluster take 2-3 minutes, more than the suite's 15-minute budget leaves: opt in.
    # (Their one failure, the trainer kill on a loaded machine, was a trainer killed while DeepSpeed compiled its
    # shm op: the stale lock hung every later trainer. actors/trainer.py no longer builds that op.)
    # `onspec bench chaos` runs the same scenarios.
    if not os.environ.get("ONSPEC_CHAOS_TESTS"):
        pytest.skip("set ONSPEC_CHAOS_TESTS=1 to run the faults on a real cluster (or: onspec bench chaos)")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cfg = OnspecConfig(data_dir=DATA_DIR).merged(**{
        # Short windows, steps on fresh records only, no yielding to serving: the trainer keeps up with the
        # stream, so that it has something to lose and reclaims it soon.
        "stream.context_window": 32, "trainer.fresh_per_step": 4, "trainer.batch_windows": 4,
        "trainer.busy_duty": 1.0, "trainer.read_count": 16,
        "registry.poll_interval_s": 0.2, "redis.reconnect_backoff_s": 0.05,
    })
    cluster = journal = None
    try:
        cluster, journal = bc.start_chaos_cluster(cfg, tmp_path_factory.mktemp("chaos"), replicas=1,
                                                  coverage_every=12)
        # drain=False: each scenario checks what was acknowledged so far; the last test drains and checks all.
        yield bc.Chaos(cluster, journal, read_prompts(packaged_prompts()), cfg.model.name, replicas=1, clients=2,
                       max_tokens=16, timeout_s=90, requests=4, recover_s=120, drain_s=120, redis_down_s=3,
                       after_recovery=1, drain=False, log=print)
    finally:
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            # Whatever this module started and a failure left behind (Ray's processes, a redis-server).
            for p in psutil.Process().children(recursive=True):
                if p.pid not in before and _ours(p):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass


def _healthy(res: dict) -> None:
    print(json.dumps(res))
    assert res["hung"] == 0, res
    assert res["failed_unclear"] == 0, res["errors"]
    assert res["records_lost"] == 0, res["stream"]


def _serves(c, max_tokens: int = 4) -> dict:
    r = httpx.post(c.cluster.url + "/v1/completions", timeout=60,
                   json={"model": c.model, "prompt": "The capital of France is", "max_tokens": max_tokens,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.real_model
def test_tampered_checkpoint_is_refused_and_the_replica_keeps_its_drafter(chaos):
    res = bc.corrupt_checkpoint(chaos)
    _healthy(res)
    assert res["failed"] == 0 and res["completed"] >= 4
    assert res["served_by_tampered"] == 0
    assert res["replica_versions_after"] == res["replica_versions_before"]
    assert all(n >= 2 for n in res["refused_per_replica"].values())  # the overwritten and the truncated one
    reg = DrafterRegistry.from_url(chaos.cfg.redis.url, chaos.cfg.data_dir, chaos.cfg.registry.prefix)
    assert reg.serving() not in res["tampered_versions"]
    assert all(reg.show(v)["status"] == "rejected" for v in res["tampered_versions"])
    assert _serves(chaos)["usage"]["drafter_version"] in res["replica_versions_before"]


@pytest.mark.real_model
def test_redis_killed_and_restarted_serving_goes_on_and_the_group_survives(chaos):
    res = bc.kill_redis(chaos)
    _healthy(res)
    assert res["failed"] == 0, res["errors"]  # Redis is off the request path
    assert res["completed_while_down"] >= 2
    assert res["group_intact"]
    assert res["stream_entries_after_restart"] >= res["stream_entries_before_kill"]  # the AOF kept them
    assert res["writes_resumed_s"] >= 0 and res["trainer_resumed_s"] >= 0  # new entries written and read
    r = redis.Redis.from_url(chaos.cfg.redis.url)
    assert bc.group_info(r, chaos.cfg.redis.stream_key, chaos.cfg.trainer.consumer_group)["consumers"] >= 1


@pytest.mark.real_model
def test_trainer_killed_mid_step_loses_no_acknowledged_record(chaos):
    res = bc.kill_trainer(chaos)
    _healthy(res)
    assert res["failed"] == 0, res["errors"]
    assert res["killed_mid_step"] and res["records_in_killed_step"] >= 1
    # What the dead incarnation had read but not acknowledged, the new one took back and used.
    assert res["pending_reclaimed"] == res["pending_at_kill"] >= res["records_in_killed_step"]
    assert res["killed_step_retrained"] == res["records_in_killed_step"]
    assert res["stream"]["incarnations"] >= 2
    assert chaos.cluster.trainer_call("state")["alive"]


@pytest.mark.real_model
def test_engine_replica_killed_is_replaced_and_no_request_hangs(chaos):
    res = bc.kill_replica(chaos)
    _healthy(res)
    assert res["in_flight_outcomes"]["hung"] == 0
    assert res["completed_after_recovery"] >= 1
    _serves(chaos)


@pytest.mark.real_model
def test_after_all_faults_every_acknowledged_record_was_used(chaos):
    """The last word: the trainer drains the stream, and the whole consumer group is checked against every
    incarnation's journal."""
    _serves(chaos, max_tokens=16)  # at least one record (a coverage record every 12 tokens), run alone or not
    st = chaos.drain_and_audit(drain=True)
    print(json.dumps(st))
    assert st["drained"] and st["pending"] == 0 and st["undelivered"] == 0, st
    assert st["records_lost"] == 0, st
    assert st["acked"] == st["stream_records"] > 0
