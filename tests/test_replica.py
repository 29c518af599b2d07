"""The plain Replica (no Ray): results equal the engine's, streams concatenate to them, refusals are error events,
an abandoned stream frees the engine, and rejection records reach a real redis-server."""
import asyncio
import time

import pytest
import redis

from onspec.actors.requests import SamplingParams
from onspec.actors.models import initial_version
from onspec.actors.replica import Replica
from onspec.actors.stream_logger import StreamLogger, decode_record, encode_record
from onspec.actors.config import OnspecConfig
from onspec.cluster.redis_server import RedisServer

from tests.conftest import DATA_DIR

pytestmark = pytest.mark.real_model
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


# Fixed-length drafts: the base drafter is rejected in most rounds, so records are certain (the adaptive
# controller would soon stop drafting with it).
CFG = OnspecConfig(data_dir=DATA_DIR).merged(**{"stream.context_window": 16, "stream.topk": 4,
                                                "speculation.mode": "fixed", "speculation.fixed_k": 3,
                                                # the model drafter only: a repeated prompt would otherwise be
                                                # drafted (and accepted) whole from the suffix index
                                                "speculation.source": "model"})


@pytest.fixture(scope="module")
def engine():
    import torch

    from onspec.actors.engine import SpeculativeEngine

    # One torch thread, as in a serving replica: on this shared 2-core machine two OpenMP threads slow down
    # many times over whenever another process takes a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield SpeculativeEngine.from_config(CFG)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def replica(engine, redis_server):
    cfg = CFG
    log = StreamLogger(redis_server.url, "test:replica", encode=lambda item: encode_record(*item),
                       flush_interval_s=0.02)
    rep = Replica(cfg, engine=engine, logger=log)
    yield rep
    rep.close()


@pytest.fixture(scope="module")
def want(engine):
    # Before any replica owns the engine: one thread at a time may drive it.
    return engine.generate(engine.encode(PROMPT), SamplingParams(max_tokens=12, temperature=0.0))


def test_complete_and_stream_match_generate(want, replica, engine):
    req = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "label": "colors", "request_id": "r1"}
    res = replica.complete(req)
    assert res["type"] == "result" and res["text"] == want.text and res["token_ids"] == want.token_ids
    u = res["usage"]
    assert u["completion_tokens"] == 12 and u["total_tokens"] == u["prompt_tokens"] + 12
    assert u["drafter_version"] == initial_version(CFG.drafter) and 0 <= u["accepted_tokens"] <= u["drafted_tokens"]
    events = list(replica.stream(req))
    assert events[0] == {"type": "start", "prompt_tokens": u["prompt_tokens"], "prompt_ids": engine.encode(PROMPT)}
    assert "".join(e["text"] for e in events if e["type"] == "delta") == want.text
    assert events[-1]["type"] == "end" and events[-1]["finish_reason"] == "length"


def test_refusals_are_error_events(replica):
    assert replica.complete({"prompt": "", "max_tokens": 4})["error"]["code"] == "empty_prompt"
    long = replica.complete({"prompt": "word " * 3000, "max_tokens": 4})
    assert long["status"] == 400 and long["error"]["code"] == "context_length_exceeded"
    assert replica.complete({"prompt": "x", "max_tokens": 4, "top_p": 0})["error"]["param"] == "top_p"


def test_rejections_reach_redis_with_label(replica, redis_server):
    replica.complete({"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "label": "colors",
                      "request_id": "r2"})
    assert replica.logger.flush(10)
    recs = [decode_record(f) for _, f in redis.Redis.from_url(redis_server.url).xrange("test:replica")]
    mine = [r for r in recs if r["request_id"] == "r2"]
    assert mine, "the base drafter is rejected often; expected at least one record"
    r = mine[0]
    assert r["label"] == "colors" and r["schema_version"] == 1 and len(r["context"]) <= 16
    assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == 4 and r["topk_ids"][0] == r["target_token"]
    assert 0 <= r["rejected_pos"] < len(r["drafts"])


def test_abandoned_stream_frees_the_engine(replica):
    async def scenario():
        gen = replica.astream({"prompt": PROMPT, "max_tokens": 400, "temperature": 0.0})
        assert (await gen.__anext__())["type"] == "start"
        assert (await gen.__anext__())["type"] == "delta"
        await gen.aclose()  # what a client disconnect does
        t = time.perf_counter()
        res = await replica.acomplete({"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0})
        return res, time.perf_counter() - t

    res, took = asyncio.run(scenario())
    assert res["type"] == "result" and res["usage"]["completion_tokens"] == 4
    assert took < 20, f"the next request waited {took:.1f} s: the abandoned one kept generating"
    assert replica.cancelled == 1


def _within(coro, timeout_s: float = 20.0):
    """Await a replica call with a deadline: a replica whose decoding thread died would never answer."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def _fake_replica(step_gate=None):
    from tests.fake_backend import FakeEngine

    class Engine(FakeEngine):
        def step(self):
            if step_gate is not None:
                assert step_gate.wait(30), "the test never opened the gate"
            return super().step()

    return Replica(OnspecConfig(), engine=Engine())


def test_a_caller_whose_event_loop_closed_does_not_stop_the_replica():
    """The caller read the start of its stream and its event loop ended (asyncio.run returned) while its request
    was still decoding: the replica drops that caller's events and serves the next request."""
    import threading

    gate = threading.Event()
    rep = _fake_replica(gate)
    try:
        async def read_start():
            async for ev in rep.astream({"prompt": "a b", "max_tokens": 3}):
                if ev["type"] == "start":
                    return

        asyncio.run(read_start())
        gate.set()  # the abandoned request's tokens now go to a closed loop
        res = _within(rep.acomplete({"prompt": "c d", "max_tokens": 3}))
        assert res["type"] == "result" and res["token_ids"] == [1, 2, 3]
        assert rep._thread.is_alive()
    finally:
        gate.set()
        rep.close()


def test_a_request_whose_handling_fails_gets_a_server_error_and_the_rest_go_on(monkeypatch):
    rep = _fake_replica()
    plain = Replica._emit_tokens

    def emit_tokens(self, job, seq, jobs):
        if job.req.get("label") == "boom":
            raise ValueError("cannot decode")
        return plain(self, job, seq, jobs)

    monkeypatch.setattr(Replica, "_emit_tokens", emit_tokens)
    try:
        failed = _within(rep.acomplete({"prompt": "a b", "max_tokens": 3, "label": "boom"}))
        assert failed["type"] == "error" and failed["status"] == 500
        assert "cannot decode" in failed["error"]["message"]
        res = _within(rep.acomplete({"prompt": "a b", "max_tokens": 3}))
        assert res["type"] == "result" and res["token_ids"] == [1, 2, 3]
    finally:
        rep.close()


def test_streamed_deltas_within_the_interval_go_out_as_one_and_the_end_is_not_held():
    """stream_interval: the first token goes out at once, later deltas wait for the interval and leave merged
    (text, ids and logprobs joined in order), and the end flushes them without waiting the interval out."""
    from onspec.actors.replica import merged_deltas

    rep = _fake_replica()
    emitted = []
    rep.submit = lambda req, emit: emitted.append(emit) or object()  # the test plays the decoding thread

    def delta(i):
        return {"type": "delta", "text": f"t{i} ", "token_ids": [i], "logprobs": [(i, -0.5, [])]}

    async def scenario():
        loop = asyncio.get_running_loop()
        gen = rep.astream({"prompt": "a"}, interval=30.0)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        emit = emitted[0]
        emit({"type": "start", "prompt_tokens": 1})
        emit(delta(1))
        assert (await first)["type"] == "start"
        t0 = loop.time()
        assert await asyncio.wait_for(gen.__anext__(), 5) == delta(1)  # nothing sent yet: not held
        held = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        emit(delta(2))
        emit(delta(3))
        await asyncio.sleep(0.05)
        assert not held.done()  # within the interval: waiting for more
        emit({"type": "end", "finish_reason": "length"})
        got = await asyncio.wait_for(held, 5)
        assert got == merged_deltas(delta(2), delta(3))
        assert got["text"] == "t2 t3 " and got["token_ids"] == [2, 3] and len(got["logprobs"]) == 2
        assert (await asyncio.wait_for(gen.__anext__(), 5))["type"] == "end"
        assert loop.time() - t0 < 5  # the end did not wait the 30 s interval out

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        rep.close()
