"""The online trainer on tiny models and a real redis-server: consumer-group semantics (ack only after the step
that used a record, resume after a restart, reclaim from a dead consumer), training that lowers the loss, and
the promotion gate."""
import random
import time

import pytest
import redis
import torch

from onspec.actors.requests import RoundRecord
from onspec.actors.models import derive_drafter
from onspec.actors.registry import DrafterRegistry
from onspec.actors.stream_logger import encode_record
from onspec.actors.stream_reader import StreamReader
from onspec.actors.trainer import OnlineTrainer
from onspec.actors.windows import Window, window_from_record
from onspec.actors.config import OnspecConfig
from tests.conftest import tiny_target

KEY, GROUP = "test:rejections", "trainers"


@pytest.fixture(scope="module")
def server(module_redis_server):
    return module_redis_server


@pytest.fixture()
def client(server):
    c = redis.Redis.from_url(server.url)
    c.flushall()
    return c


def _records(n, seed=0, vocab=96):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(10, 30))]
        drafts = [rng.randrange(vocab) for _ in range(4)]
        out.append(RoundRecord(context=ctx, drafts=drafts, accepted=i % 4, target_token=rng.randrange(vocab),
                               topk_ids=[1, 2], topk_logprobs=[-0.5, -1.0], drafter_version="base",
                               temperature=0.0 if i % 3 else 0.8))
    return out


def _write(client, records):
    return [client.xadd(KEY, encode_record(r, "test", 1.0, f"req-{i}")).decode() for i, r in enumerate(records)]


def _trainer(client, tmp_path, consumer="t0", claim_idle_ms=60_000, **trainer):
    cfg = OnspecConfig(data_dir=tmp_path).merged(**{"trainer.consumer": consumer, "trainer.batch_windows": 4,
                                                     "trainer.fresh_per_step": 2, "trainer.holdout_percent": 1,
                                                     "trainer.holdout_split": "record",
                                                     **{f"trainer.{k}": v for k, v in trainer.items()}})
    target = tiny_target()
    counts = torch.arange(target.config.vocab_size, 0, -1).double()
    drafter = derive_drafter(target, 2, 64, counts=counts)
    registry = DrafterRegistry(client, tmp_path)
    registry.ensure_registered(drafter)
    reader = StreamReader(client, KEY, GROUP, consumer, claim_idle_ms=claim_idle_ms, count=8)
    reader.ensure_group()
    return OnlineTrainer(cfg, target, drafter, registry, reader)


def _pending_of(client, consumer):
    return {e["message_id"].decode() for e in client.xpending_range(KEY, GROUP, "-", "+", 1000, consumername=consumer)}


def test_window_from_record_puts_the_rejected_row_before_the_correction():
    rec = {"context": [5, 6, 7], "drafts": [8, 9, 10], "rejected_pos": 1, "target_token": 42, "temperature": 0.0}
    w = window_from_record(rec, "1-0")
    assert w.ids == [5, 6, 7, 8, 42]
    assert w.ids[w.rejected_row + 1] == 42 and w.greedy


def test_records_are_acknowledged_only_after_the_step_that_used_them(client, tmp_path):
    ids = _write(client, _records(12))
    tr = _trainer(client, tmp_path, holdout_percent=1)
    tr.poll()
    read = {w.record_id for w in tr.fresh}
    held = {w.record_id for w in tr.holdout}
    assert read | held == set(ids[:8])
    assert _pending_of(client, "t0") == read  # read but not trained on: still pending
    tr.step_records()  # takes 2 fresh windows
    trained = read - {w.record_id for w in tr.fresh}
    assert len(trained) == 2
    assert _pending_of(client, "t0") == read - trained
    while tr.step_records():
        pass
    assert _pending_of(client, "t0") == set()
    assert tr.stats.records_acked == 8


def test_a_restarted_trainer_resumes_its_own_pending_records_first(client, tmp_path):
    ids = _write(client, _records(10))
    first = _trainer(client, tmp_path)
    first.poll()
    first.step_records()  # 2 acknowledged; the rest pending with t0 when it "dies"
    left = _pending_of(client, "t0")
    held = {w.record_id for w in first.holdout}  # 1% of records, by id: acknowledged at once
    assert left == {w.record_id for w in first.fresh} and len(left) == 6 - len(held)
    again = _trainer(client, tmp_path)  # same consumer name: a restart
    again.poll()
    assert {w.record_id for w in again.fresh} | {w.record_id for w in again.holdout} == left
    again.poll()  # then new records, from where the group left off
    assert {w.record_id for w in again.fresh} >= set(ids[8:]) - {w.record_id for w in again.holdout}
    while again.step_records():
        pass
    assert client.xpending(KEY, GROUP)["pending"] == 0
    assert again.stats.records_acked + first.stats.records_acked == 10  # none lost, none acknowledged twice


def test_records_of_a_dead_consumer_are_claimed(client, tmp_path):
    _write(client, _records(6))
    dead = StreamReader(client, KEY, GROUP, "dead", count=6)
    dead.ensure_group()
    got = dead.read()
    assert len(got) == 6 and len(_pending_of(client, "dead")) == 6
    alive = _trainer(client, tmp_path, consumer="alive", claim_idle_ms=1)
    alive.reader._own_cursor = None
    deadline_polls = 5
    while _pending_of(client, "dead") and deadline_polls:
        alive.poll()
        deadline_polls -= 1
    assert _pending_of(client, "dead") == set()
    assert alive.reader.claimed == 6
    while alive.step_records():
        pass
    assert client.xpending(KEY, GROUP)["pending"] == 0


def test_training_on_records_lowers_the_loss_and_replays(client, tmp_path):
    _write(client, _records(16))
    tr = _trainer(client, tmp_path, lr=3e-3)
    while tr.poll():
        pass
    batch = list(tr.fresh)[:4]
    first = tr.train_on(batch)
    for _ in range(15):
        last = tr.train_on(batch)
    assert last < 0.7 * first
    while tr.step_records():
        pass
    assert len(tr.replay) == 16 - len(tr.holdout)
    assert tr.step_onpolicy() and tr.stats.onpolicy_steps == 1


def test_the_gate_refuses_a_worse_candidate_and_promotes_a_better_one(client, tmp_path):
    _write(client, _records(40, seed=3))
    tr = _trainer(client, tmp_path, holdout_percent=50, min_holdout=4, promote_margin=0.0)
    while tr.poll():
        pass
    assert len(tr.holdout) >= 4
    with torch.no_grad():  # a ruined drafter: noise over every weight of its own
        for name, p in tr.drafter.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 5)
    worse = tr.maybe_promote(force=True)
    assert worse["decision"] == "rejected"
    info = tr.registry.show(worse["version"])
    assert info["status"] == "rejected" and "gate refused" in info["reason"]
    assert tr.registry.serving() == "base"
    # The reverse: the serving drafter is the ruined one, the working copy is the base again.
    ruined = tr.registry.show(worse["version"])
    tr.serving_drafter, tr.serving_version = tr.registry.load(ruined["version"], tr.target), ruined["version"]
    tr.registry.promote(ruined["version"], "test: serve the ruined one")
    base = tr.registry.load("base", tr.target)
    tr.drafter.load_state_dict(base.own_state_dict(), strict=False)
    better = tr.maybe_promote(force=True)
    assert better["decision"] == "promoted"
    assert tr.registry.serving() == better["version"]
    assert better["candidate"]["gate"] > better["serving"]["gate"]


def test_window_weights_put_the_rejected_row_up(tmp_path, client):
    tr = _trainer(client, tmp_path, rejected_weight=4.0)
    w = Window(ids=[1, 2, 3, 4, 5], rejected_row=2, greedy=True, first_row=1)
    assert tr._row_weights(w).tolist() == [0.0, 1.0, 4.0, 1.0, 1.0]


def test_a_constrained_record_teaches_its_served_distribution_at_its_rejected_row_only(tmp_path, client):
    """A structured request's record carries the grammar-masked target's top-k: the window learns there only,
    and its teacher is that distribution, not the unmasked target's that the trainer's forward computes."""
    from onspec.actors.windows import score_windows

    tr = _trainer(client, tmp_path)
    kept = tr.kept.tolist()
    allowed = [kept[5], kept[9]]
    rec = {"context": [3, 4, 5, 6], "drafts": [7, 8], "rejected_pos": 1, "target_token": allowed[0],
           "temperature": 0.0, "constrained": True, "topk_ids": allowed, "topk_logprobs": [-0.2, -1.7]}
    w = window_from_record(rec, "1-0")
    assert tr._row_weights(w).tolist() == [0.0, 0.0, 0.0, 0.0, tr.tc.rejected_weight, 0.0]
    score_windows(tr.target, tr.kept, [w], tr.tc.teacher_topk)
    t, row = w.teacher, w.rejected_row
    listed = dict(zip(t.idx[row].tolist(), t.probs[row].tolist()))
    assert listed[5] == pytest.approx(0.8187, abs=1e-3) and listed[9] == pytest.approx(0.1827, abs=1e-3)
    assert sum(p > 0 for p in listed.values()) == 2 and t.argmax[row] == allowed[0]
    assert float(t.kept_mass[row]) == pytest.approx(0.8187 + 0.1827, abs=1e-3)
    free = window_from_record({**rec, "constrained": False}, "1-1")
    assert free.served is None and tr._row_weights(free).sum() > 1
    # nothing the drafter keeps among what the grammar allowed: the window teaches nothing
    outside = [i for i in range(tr.target.config.vocab_size) if i not in set(kept)][:1]
    if outside:
        lost = window_from_record({**rec, "topk_ids": outside, "topk_logprobs": [-0.1]}, "1-2")
        score_windows(tr.target, tr.kept, [lost], tr.tc.teacher_topk)
        assert lost.rejected_row is None and tr._row_weights(lost).sum() == 0


def test_time_split_holds_back_whole_blocks_of_traffic(client, tmp_path):
    """The gate judges requests the drafter never trained on: records of one time block all go one way."""
    tr = _trainer(client, tmp_path, holdout_split="time", holdout_block_s=10.0, holdout_percent=30)
    blocks = {}
    for ms in range(0, 2_000_000, 2_500):  # 200 blocks of 10 s, four records each
        blocks.setdefault(ms // 10_000, set()).add(tr._held_back(f"{1_700_000_000_000 + ms}-{ms % 7}"))
    assert all(len(sides) == 1 for sides in blocks.values())
    held = sum(True in sides for sides in blocks.values()) / len(blocks)
    assert 0.15 < held < 0.45  # about holdout_percent of the blocks


def test_state_reports_throughput_and_record_wait(client, tmp_path):
    ids = _write(client, _records(8))
    tr = _trainer(client, tmp_path, onpolicy=False, batch_windows=4, fresh_per_step=4)
    tr._held_back = lambda rid: False  # rates, not the gate: a held-back record would make step 2 replay one
    tr.poll()
    assert tr.step_records() and tr.step_records()
    st = tr.state()
    assert st["steps"] == 2 and st["steps_per_min"] > 0
    # every real position of the windows is supervised (a window's first row predicts its second token)
    windows = [w for _, w in tr.replay]
    assert st["tokens_supervised"] == sum(len(w.ids) for w in windows)
    assert st["tokens_supervised_per_min"] > 0
    oldest_ms = int(ids[0].split("-")[0])
    assert 0 <= st["record_wait_p50_s"] <= st["record_wait_max_s"] <= time.time() - oldest_ms / 1000 + 1


def test_the_trainer_takes_every_core_only_while_serving_is_idle(client, tmp_path):
    tr = _trainer(client, tmp_path, threads=1, idle_threads=3)
    before = torch.get_num_threads()
    try:
        tr._use_threads(busy=True)
        assert torch.get_num_threads() == 1 and tr.state()["threads"] == 1
        tr._use_threads(busy=False)
        assert torch.get_num_threads() == 3 and tr.state()["threads"] == 3
    finally:
        torch.set_num_threads(before)


def test_a_step_gives_its_cores_back_when_a_request_arrives_mid_step(client, tmp_path):
    """A step begun on every core while serving was idle drops to ``threads`` at its next part once a replica
    reports a request in flight; with none in flight it keeps them."""
    import json

    tr = _trainer(client, tmp_path, threads=1, idle_threads=2, busy_duty=0.25)
    rng = random.Random(3)
    windows = lambda: [Window(ids=[rng.randrange(96) for _ in range(20)], rejected_row=None, greedy=True,  # noqa: E731
                              label="t") for _ in range(4)]
    before = torch.get_num_threads()
    try:
        tr._use_threads(busy=False)
        tr.train_on(windows())
        assert torch.get_num_threads() == 2 and tr.stats.mid_step_yields == 0  # idle: every core, to the end
        client.set(f"{tr.cfg.registry.load_key_prefix}:replica-a", json.dumps({"in_flight": 1, "queued": 0}))
        tr.train_on(windows())
        assert torch.get_num_threads() == 1 and tr.stats.mid_step_yields == 1
    finally:
        torch.set_num_threads(before)


def _until(pred, timeout=30.0, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_on_spare_capacity_only_the_trainer_computes_nothing_while_a_request_is_in_flight(client, tmp_path):
    """busy_duty 0: no step starts while a replica reports a request in flight, and a step that meets one at a
    part boundary waits there until the report clears, then finishes."""
    import json
    import threading

    tr = _trainer(client, tmp_path, busy_duty=0.0, onpolicy=False)
    load = f"{tr.cfg.registry.load_key_prefix}:replica-a"
    _write(client, _records(6))
    client.set(load, json.dumps({"in_flight": 1, "queued": 0}))
    stop = threading.Event()
    loop = threading.Thread(target=tr.run, args=(stop,), daemon=True)
    loop.start()
    try:
        _until(lambda: tr.stats.busy_waits == 1, what="the trainer to see the load")
        assert tr.stats.records_read == 0 and tr.stats.steps == 0  # it has not even read the stream
        client.delete(load)
        _until(lambda: tr.stats.steps >= 1, what="a step once serving is idle")
    finally:
        stop.set()
        loop.join(timeout=30)
    rng = random.Random(4)
    windows = [Window(ids=[rng.randrange(96) for _ in range(20)], rejected_row=None, greedy=True, label="t")
               for _ in range(4)]
    client.set(load, json.dumps({"in_flight": 1, "queued": 0}))  # a request arrives as the step starts
    steps = tr.stats.steps
    step = threading.Thread(target=tr.train_on, args=(windows,), daemon=True)
    step.start()
    _until(lambda: tr.stats.mid_step_yields == 1, what="the step to stop at a part boundary")
    assert step.is_alive() and tr.stats.steps == steps  # held there, not computing beside the request
    client.delete(load)
    step.join(timeout=30)
    assert not step.is_alive() and tr.stats.steps == steps + 1


def test_on_spare_capacity_only_serving_must_stay_idle_for_the_grace_before_the_trainer_computes(client, tmp_path):
    """A gap between two requests shorter than idle_grace_s (a closed-loop client's next request) starts nothing:
    a request seen during the grace restarts it."""
    import json

    tr = _trainer(client, tmp_path, busy_duty=0.0, idle_grace_s=0.3)
    load = f"{tr.cfg.registry.load_key_prefix}:replica-a"
    client.set(load, json.dumps({"in_flight": 1, "queued": 0}))
    assert not tr.idle_gate.open(tr.serving_busy())
    client.delete(load)
    t0 = time.monotonic()
    assert not tr.idle_gate.open(tr.serving_busy())  # idle only just now
    client.set(load, json.dumps({"in_flight": 1, "queued": 0}))  # the next request, within the grace
    assert not tr.idle_gate.open(tr.serving_busy())
    time.sleep(0.15)  # the request runs a while: a grace counted from t0 would end 0.15 s after t1
    client.delete(load)
    t1 = time.monotonic()
    _until(lambda: tr.idle_gate.open(tr.serving_busy()), what="the grace to pass")
    assert time.monotonic() - t1 >= 0.3 and time.monotonic() - t0 >= 0.3
