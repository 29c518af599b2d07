"""Continuous batching on tiny models: every request in a batch gets exactly what it would get alone (greedy, and
seeded sampling), whoever joins, leaves or is cancelled around it; the draft-length policy knows what a batch
costs; the replica streams stop strings and refuses what it cannot queue."""
import threading

import pytest

from onspec.actors.requests import SamplingParams
from onspec.actors.replica import Replica
from onspec.actors.config import OnspecConfig
from tests.conftest import tiny_engine
from tests.fake_backend import FakeEngine

PROMPTS = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 40, 41, 40], [77], [i % 90 + 1 for i in range(50)]]


def _run(eng, jobs, cancel_after: dict | None = None):
    """Submit one job per step (staggered joins), step until all finish; returns each job's tokens."""
    pending, seqs, outs, widest, steps = list(jobs), [], {}, 0, 0
    while pending or eng.busy:
        if pending:
            prompt, params, speculate = pending.pop(0)
            seqs.append(eng.submit(prompt, params, speculate))
        for s in eng.step():
            outs.setdefault(id(s), []).extend(s.new)
        steps += 1
        widest = max(widest, len(eng.active))
        assert sorted(s.slot for s in eng.active) == list(range(len(eng.active)))  # rows stay packed
        for i, at in (cancel_after or {}).items():
            if steps == at:
                eng.cancel(seqs[i])
    return [outs.get(id(s), []) for s in seqs], widest


@pytest.mark.parametrize("drafter_layers", [1, 3])
def test_a_batch_gives_each_greedy_request_what_it_gets_alone(drafter_layers):
    eng = tiny_engine(drafter_layers=drafter_layers, mode="fixed", fixed_k=3)
    eng.prefill_chunk = 16  # the 50-token prompt joins in chunks while the others decode
    jobs = [(p, SamplingParams(max_tokens=n), spec) for p, n, spec in
            zip(PROMPTS * 2, (20, 7, 30, 12, 25, 9, 16, 3, 22, 14), [True, True, False, True, True] * 2)]
    alone = [eng.generate(p, params, speculate=False).token_ids for p, params, _ in jobs]
    got, widest = _run(eng, jobs)
    assert got == alone
    assert widest >= 4


def test_seeded_sampling_in_a_batch_repeats_what_it_draws_alone():
    eng = tiny_engine(drafter_layers=3, mode="fixed", fixed_k=3)
    jobs = [(p, SamplingParams(max_tokens=15, temperature=0.9, seed=100 + i), True) for i, p in enumerate(PROMPTS)]
    alone = [eng.generate(p, params, speculate=False).token_ids for p, params, _ in jobs]
    got, _ = _run(eng, jobs)
    assert got == alone


def test_a_cancelled_row_leaves_and_the_others_go_on_unchanged():
    eng = tiny_engine(drafter_layers=3, mode="fixed", fixed_k=2)
    jobs = [(p, SamplingParams(max_tokens=25), True) for p in PROMPTS[:4]]
    alone = [eng.generate(p, params, speculate=False).token_ids for p, params, _ in jobs]
    got, _ = _run(eng, jobs, cancel_after={1: 6})
    assert got[0] == alone[0] and got[2:] == alone[2:]
    assert 0 < len(got[1]) < 25 and got[1] == alone[1][:len(got[1])]
    assert not eng.busy


def test_the_draft_length_follows_what_a_batch_costs():
    eng = tiny_engine(cost_aware=True, max_draft=4)
    eng.calibrated = True
    # One row: extra tokens are nearly free (memory-bound); eight rows: every token costs its full share.
    eng.batch_costs = {1: [1.0 + 0.05 * t for t in range(5)], 8: [8.0 * (t + 1) for t in range(5)]}
    eng.draft_costs = {1: 0.05, 8: 0.4}
    eng.controller.draft_cost = 0.05
    eng._use_rows(1)
    assert eng.controller.draft_cap() >= 2  # drafting pays
    eng._use_rows(8)
    assert eng.controller.draft_cap() in (0, 1)  # compute-bound: plain decoding (or a probe now and then)


def _events(rep, req):
    return list(rep.stream(req))


def test_the_replica_ends_the_text_before_a_stop_string():
    rep = Replica(OnspecConfig(), engine=FakeEngine())
    try:
        events = _events(rep, {"prompt": "a b", "max_tokens": 3, "stop": ["w2"]})
        text = "".join(e["text"] for e in events if e["type"] == "delta")
        assert text == " w1 " and events[-1]["finish_reason"] == "stop"
        events = _events(rep, {"prompt": "a b", "max_tokens": 3, "stop": ["zz"]})
        assert "".join(e["text"] for e in events if e["type"] == "delta") == " w1 w2 w3"
        assert events[-1]["finish_reason"] == "length"
    finally:
        rep.close()


def test_a_full_replica_refuses_with_429():
    gate = threading.Event()

    class Slow(FakeEngine):
        max_rows = 1

        def step(self):
            gate.wait(30)
            return super().step()

    rep = Replica(OnspecConfig(), engine=Slow())
    rep.max_waiting = 1
    try:
        got = []
        for _ in range(2):  # one decoding, one waiting
            rep.submit({"prompt": "a b", "max_tokens": 2}, got.append)
        refused = []
        rep.submit({"prompt": "a b", "max_tokens": 2}, refused.append)
        assert refused[0]["type"] == "error" and refused[0]["status"] == 429 and rep.refused == 1
        gate.set()
    finally:
        gate.set()
        rep.close()


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 5}])
def test_a_request_resumed_from_what_a_dead_replica_streamed_ends_the_same(sampling):
    rep = Replica(OnspecConfig(), engine=tiny_engine(drafter_layers=3, mode="fixed", fixed_k=3))
    prompt = [5, 9, 13, 2]
    try:
        def run(out):
            sent = rep.engine.tokenizer.decode(out)
            return sent, rep.complete({"resume": {"prompt_ids": prompt, "output_ids": out, "sent": sent},
                                       "max_tokens": 20, **sampling})
        _, whole = run([])
        assert len(whole["token_ids"]) == 20
        sent, rest = run(whole["token_ids"][:7])
        assert rest["token_ids"] == whole["token_ids"][7:]
        assert sent + rest["text"] == whole["text"]
        assert rest["usage"]["completion_tokens"] == 20 and rest["usage"]["prompt_tokens"] == len(prompt)
    finally:
        rep.close()


def test_a_batch_is_verified_at_the_width_that_pays_for_all_its_rows():
    from onspec.kernels.draft_length import best_batch_width

    sure = [1.0 + 0.9 * d for d in range(9)]  # a suffix draft of 8 that would nearly all be accepted
    unsure = [1.0, 1.3, 1.4]                   # model drafts of little promise
    flat = [1.0] * 9                           # memory-bound: width costs nothing
    assert best_batch_width([sure, unsure], flat, [0.0] * 9) == 9
    linear = [float(w) for w in range(1, 10)]  # compute-bound: each position costs its full share
    assert best_batch_width([sure, unsure, [1.0], [1.0]], linear, [0.0] * 9) == 1
    rising = [1.0 + 0.1 * w for w in range(9)]
    assert best_batch_width([unsure] * 4, rising, [0.0] * 9) == 2  # 5.2 / 1.1 beats 4 / 1.0 and 5.6 / 1.2


def test_records_of_requests_decoded_together_carry_their_own_tags():
    """Rejection records from a batch: each names the request (label, request id) whose row it came from, and
    its context is that request's own tokens."""
    class Logger:
        def __init__(self):
            self.items = []

        def log(self, item):
            self.items.append(item)

        def stats(self):
            return {}

        def ping(self):
            return True

        def close(self):
            pass

    cfg = OnspecConfig().merged(**{"stream.coverage_every": 4})
    log = Logger()
    rep = Replica(cfg, engine=tiny_engine(drafter_layers=1, mode="fixed", fixed_k=3), logger=log)
    prompts = {f"r{i}": [10 * i + 1, 10 * i + 2, 10 * i + 3] for i in range(1, 5)}
    out = {}

    def send(rid):
        out[rid] = rep.complete({"resume": {"prompt_ids": prompts[rid], "output_ids": [], "sent": ""},
                                 "max_tokens": 24, "temperature": 0.0, "label": f"lab-{rid}", "request_id": rid})

    try:
        threads = [threading.Thread(target=send, args=(rid,)) for rid in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert rep.max_batch_seen >= 2  # they really shared rounds
    finally:
        rep.close()
    assert {rid for _, _, _, rid in log.items} == set(prompts)
    for rec, label, _, rid in log.items:
        assert label == f"lab-{rid}"
        whole = prompts[rid] + out[rid]["token_ids"]  # the record's context is a window of its own sequence
        n = len(rec.context)
        assert any(whole[i:i + n] == rec.context for i in range(len(whole) - n + 1)), (rid, rec.context)
