"""A short online run on the real model, in one process: a replica serves traffic and logs its rejections to a
real redis-server, the trainer reads them through its consumer group and trains; the drafter's acceptance on a
fixed prompt set (target-generated continuations, never served) must rise, and the gate must promote it."""
import pytest
import redis

from onspec.actors.engine import SpeculativeEngine
from onspec.actors.requests import SamplingParams
from onspec.actors.models import derive_drafter, stop_token_ids
from onspec.actors.registry import DrafterRegistry
from onspec.actors.replica import Replica
from onspec.actors.stream_logger import StreamLogger, encode_record
from onspec.actors.stream_reader import StreamReader
from onspec.actors.trainer import OnlineTrainer
from onspec.actors.windows import Window
from onspec.actors.config import OnspecConfig
from onspec.cluster.redis_server import RedisServer

pytestmark = pytest.mark.real_model

TRAFFIC = ["Write a Python function that reverses a string.", "Explain what a list comprehension is.",
           "Write a SQL query that counts orders per customer.", "How do I read a file line by line in Python?",
           "Write a bash command that counts lines in all .py files.", "What does git rebase do?",
           "Write a JavaScript function that sums an array.", "Explain recursion with a short example."]
FIXED = ["Write a Python function that checks whether a number is prime.",
         "Explain what a Python dictionary is.", "Write a SQL query that finds the newest order."]


def test_acceptance_on_a_fixed_prompt_set_rises(tmp_path, real_engine):
    target, tok = real_engine.target, real_engine.tokenizer
    stops = tuple(stop_token_ids(target, tok))
    srv = RedisServer(tmp_path / "redis").start()
    try:
        cfg = OnspecConfig(data_dir=tmp_path).merged(**{
            "redis.url": srv.url, "stream.context_window": 96, "speculation.mode": "fixed",
            "speculation.fixed_k": 3, "speculation.source": "model", "trainer.lr": 1e-3, "trainer.holdout_percent": 10, "trainer.holdout_split": "record", "trainer.min_holdout": 2,
            "trainer.promote_margin": 0.0})
        engine = SpeculativeEngine(target, tok, derive_drafter(target, 2, 8192, always_keep=stops),
                                   cfg.speculation, 2048, set(stops))
        logger = StreamLogger.from_config(cfg, encode=lambda item: encode_record(*item))
        replica = Replica(cfg, engine=engine, logger=logger)
        for p in TRAFFIC:
            out = replica.complete({"messages": [{"role": "user", "content": p}], "max_tokens": 40,
                                    "temperature": 0.0})
            assert out["type"] == "result"
        assert logger.flush(30)

        client = redis.Redis.from_url(srv.url)
        registry = DrafterRegistry(client, tmp_path)
        drafter = derive_drafter(target, 2, 8192, always_keep=stops)  # the trainer's own copy
        registry.ensure_registered(drafter)
        reader = StreamReader(client, cfg.redis.stream_key, "g", "t0")
        reader.ensure_group()
        trainer = OnlineTrainer(cfg, target, drafter, registry, reader)

        greedy = SamplingParams(max_tokens=40, temperature=0.0)
        fixed = []
        for p in FIXED:
            ids = real_engine.encode(messages=[{"role": "user", "content": p}])
            gen = real_engine.generate(ids, greedy, speculate=False)
            fixed.append(Window(ids=ids + gen.token_ids, rejected_row=None, greedy=True, first_row=len(ids) - 1))
        before = trainer.acceptance(trainer.drafter, fixed, skip_rows=0)

        while trainer.poll():
            pass
        records = len(trainer.fresh) + len(trainer.holdout)
        assert records >= 40, f"only {records} rejection records from the traffic"
        # 12 steps: in one run the fixed-set acceptance went 0.017 -> 0.23 (5 steps) -> 0.28 (10) -> 0.31 (15)
        # and then fell back to 0.10 by step 30, once the 8 prompts' records were trained over again and again;
        # longer runs here test overfitting, not learning (the gate keeps such versions from serving).
        for _ in range(12):
            assert trainer.step(allow_onpolicy=True)
        # Acknowledged once trained on (or held back for the gate): what is still pending is exactly what waits.
        assert client.xpending(cfg.redis.stream_key, "g")["pending"] == len(trainer.fresh) > 0
        after = trainer.acceptance(trainer.drafter, fixed, skip_rows=0)
        assert after["greedy"] > before["greedy"] + 0.05, (before, after)
        decision = trainer.maybe_promote(force=True)
        assert decision["decision"] == "promoted", decision
        assert registry.serving() == decision["version"]
        print("fixed-set greedy acceptance", before["greedy"], "->", after["greedy"], "records", records)
        replica.close()
    finally:
        srv.stop()
