"""`onspec bench sources`: what each of the trainer's data sources adds, on the same traffic and the same number
of optimizer steps.

A replica (in this process, the configured draft policy) serves a phase file's prompts and logs its records to a
private redis-server; the records are read back once. Then, from the same starting drafter, one trainer per
variant takes ``steps`` optimizer steps:

  rejected_only       the loss only at each record's rejected position (Online Speculative Decoding's recipe)
  windows             every position of each logged window, the rejected one weighted up (onspec's default)
  windows_onpolicy    as windows, every other step on-policy: drafter continuations scored by the target

and is scored on a fixed slice of the phase's prompts that was never served: greedy acceptance of the drafter's
top token at every position of the target's own greedy continuation (teacher-forced), plus sum_v min(p, q).
"""
from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import read_prompts

VARIANTS = {
    "rejected_only": {"trainer.window_positions": False, "trainer.onpolicy": False},
    "windows": {"trainer.window_positions": True, "trainer.onpolicy": False},
    "windows_onpolicy": {"trainer.window_positions": True, "trainer.onpolicy": True},
}


def bench_sources(cfg: OnspecConfig, phase: Path, steps: int = 60, eval_prompts: int = 4, max_tokens: int = 64,
                  traffic_prompts: int = 16, log=lambda *_: None) -> dict:
    import redis

    from onspec.actors.engine import SpeculativeEngine
    from onspec.actors.requests import SamplingParams
    from onspec.actors.models import make_drafter, stop_token_ids
    from onspec.actors.registry import DrafterRegistry
    from onspec.actors.replica import Replica
    from onspec.actors.stream_logger import StreamLogger, decode_record, encode_record
    from onspec.actors.stream_reader import StreamReader
    from onspec.actors.trainer import OnlineTrainer
    from onspec.actors.windows import Window, score_windows, window_from_record
    from onspec.cluster.redis_server import RedisServer

    specs = read_prompts(phase)
    if len(specs) < eval_prompts + 1:
        raise ValueError(f"{phase}: needs more than --eval-prompts ({eval_prompts}) prompts")
    fixed_specs, traffic = specs[:eval_prompts], specs[eval_prompts:eval_prompts + traffic_prompts]
    t_start = time.time()
    engine = SpeculativeEngine.from_config(cfg)
    target, tok = engine.target, engine.tokenizer
    stops = tuple(stop_token_ids(target, tok))
    with tempfile.TemporaryDirectory() as tmp:
        srv = RedisServer(Path(tmp) / "redis").start()
        try:
            run_cfg = cfg.merged(**{"redis.url": srv.url, "data_dir": tmp})
            logger = StreamLogger.from_config(run_cfg, encode=lambda item: encode_record(*item))
            replica = Replica(run_cfg, engine=engine, logger=logger)
            served = 0
            for s in traffic:
                out = replica.complete({"prompt": s.prompt, "messages": s.messages, "max_tokens": max_tokens,
                                        "temperature": 0.0})
                served += out["usage"]["completion_tokens"] if out["type"] == "result" else 0
            logger.flush(60)
            client = redis.Redis.from_url(srv.url)
            recs = [(i.decode(), decode_record(f)) for i, f in client.xrange(run_cfg.redis.stream_key)]
            windows = [window_from_record(r, rid) for rid, r in recs]
            log(f"served {served} tokens of {len(traffic)} prompts: {len(windows)} records "
                f"({sum(w.rejected_row is not None for w in windows)} with a rejection)")

            greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            fixed = []
            for s in fixed_specs:
                ids = engine.encode(s.prompt, s.messages)
                gen = engine.generate(ids, greedy, speculate=False)
                fixed.append(Window(ids=ids + gen.token_ids, rejected_row=None, greedy=True,
                                    first_row=len(ids) - 1))

            registry = DrafterRegistry(client, tmp)
            # The target scores each window once; every variant reuses the scores.
            score_windows(target, engine.drafter.kept_ids, windows + fixed, cfg.trainer.teacher_topk)
            results = {}
            for name, overrides in VARIANTS.items():
                vcfg = run_cfg.merged(**overrides)
                drafter = make_drafter(target, cfg.drafter, always_keep=stops)
                reader = StreamReader(client, run_cfg.redis.stream_key, f"bench-{name}", "c")
                trainer = OnlineTrainer(vcfg, target, drafter, registry, reader, seed=0)
                if "base" not in results:
                    results["base"] = trainer.acceptance(trainer.drafter, fixed, skip_rows=0)
                trainer.fresh = collections.deque(Window(**{**w.__dict__}) for w in windows)
                t0 = time.time()
                for i in range(steps):
                    if vcfg.trainer.onpolicy and i % 2 == 1 and trainer.step_onpolicy():
                        continue
                    if not trainer.step_records():  # traffic used up: replay it
                        trainer.train_on(trainer._sample_replay(vcfg.trainer.batch_windows))
                acc = trainer.acceptance(trainer.drafter, fixed, skip_rows=0)
                results[name] = {**acc, "steps": trainer.stats.steps, "onpolicy_steps": trainer.stats.onpolicy_steps,
                                 "train_s": round(time.time() - t0, 1)}
                log(f"{name}: {results[name]}")
            replica.close()
        finally:
            srv.stop()
    return {"phase": str(phase), "served_tokens": served, "records": len(windows), "steps": steps,
            "fixed_prompts": eval_prompts, "max_tokens": max_tokens, "results": results,
            "wall_s": round(time.time() - t_start)}
