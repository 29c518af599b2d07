"""`onspec bench chaos`: faults injected into the real processes of a running cluster while clients keep it busy.

Scenarios (each drives closed-loop HTTP traffic from a few client threads, injects its fault, keeps the traffic
going until the service has recovered, then checks the consumer group against the trainer's journal):

  kill_replica        SIGKILL one engine replica's process (the one with requests in flight); Ray Serve replaces it
  kill_trainer        SIGKILL the trainer actor's process inside a training step; Ray restarts it and the new
                      incarnation re-reads the records the dead one had read but not acknowledged
  kill_redis          SIGKILL the private redis-server, then start it again on the same port and AOF directory
  corrupt_checkpoint  register a drafter version, overwrite (then truncate) its weights file before the replicas
                      load it, promote it: every replica must refuse it and keep serving its drafter

Every request gets one outcome: ``completed`` (200 and a whole answer), ``failed`` (an HTTP error status with an
OpenAI error body, or an error event inside a stream: a clear error), ``failed_unclear`` (anything else: a dropped
connection, a stream cut without an error), or ``hung`` (no answer within the per-request timeout).

``records_lost`` (docs/reliability.md): the trainer runs with a journal (actors/journal.py) in which every
incarnation writes what it did with each record *before* acknowledging it. After the traffic stops and the trainer
has drained the stream (nothing pending, nothing undelivered), every record the group acknowledged must appear in
the journal as applied (trained on), held (the promotion gate's slice), skipped or malformed; one that does not is
lost. Records applied by two incarnations (a crash between the step and its XACK) are counted as ``reapplied``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis
from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec
from onspec.cluster.bench.common import Load, WaitTimeout, first_api_key, start_chaos_cluster, wait_for
from onspec.cluster.bench.probes import (JournalTail, actor_pid, engine_replicas, group_info, pending_ids,
                                         replica_stats, running_engine_replicas, stream_ids)

SCENARIOS = ("kill_replica", "kill_trainer", "kill_redis", "corrupt_checkpoint")


@dataclass
class Chaos:
    """A running cluster (cluster/serve.py's Cluster, started with a trainer journal) and the traffic settings."""
    cluster: object
    journal: Path
    specs: list[PromptSpec]
    model: str
    replicas: int
    clients: int = 3
    max_tokens: int = 16
    timeout_s: float = 120.0
    requests: int = 16  # at least this many requests per scenario
    after_recovery: int = 2  # and at least this many completed after the service recovered
    recover_s: float = 300.0  # the longest wait for any recovery
    drain_s: float = 300.0
    redis_down_s: float = 10.0
    drain: bool = True  # wait for the trainer to drain the stream after each scenario (else: audit as it is)
    api_key: str | None = None  # when the server was configured with keys
    log: Callable[[str], None] = field(default=lambda *_: None)

    @property
    def cfg(self) -> OnspecConfig:
        return self.cluster.cfg

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.cfg.redis.url, socket_timeout=10, socket_connect_timeout=5)

    def load(self, label: str) -> Load:
        return Load(self.cluster.url, self.model, self.specs, self.clients, self.max_tokens, self.timeout_s,
                    label=label, seed=zlib.crc32(label.encode()) % 1000, api_key=self.api_key)

    def warm_up(self) -> float:
        """A few requests on every replica before the first fault: a replica's first speculative request also
        measures its forward costs (engine calibration), which is not what a scenario should time."""
        t = time.time()
        load = Load(self.cluster.url, self.model, self.specs, max(self.clients, self.replicas), self.max_tokens,
                    self.timeout_s, label="chaos-warmup", api_key=self.api_key)
        with load:
            load.wait(lambda l: l.count() >= 2 * self.replicas, self.recover_s, "the warm-up requests")
        return round(time.time() - t, 1)

    def finish(self, load: Load, t_recovered: float) -> None:
        """Keep the traffic going until the scenario has sent its requests and some completed once the service
        recovered, then stop it."""
        after = self.after_recovery
        load.wait(lambda l: len(l.snapshot()) >= self.requests and l.count("completed", t_recovered) >= after,
                  self.recover_s, f"{self.requests} requests and {after} completed after recovery")
        load.stop()

    def drain_and_audit(self, drain: bool | None = None) -> dict:
        """Wait until the trainer has consumed everything (no pending, no undelivered entries, the stream no
        longer growing), then check the group against the journal. Without the wait the check still holds for
        what was acknowledged so far; pending and undelivered records are judged by a later audit."""
        from onspec.actors.journal import audit, read_journal

        key, group = self.cfg.redis.stream_key, self.cfg.trainer.consumer_group
        r = self.redis()
        t0 = time.time()
        last_len = [-1]

        def drained():
            g = group_info(r, key, group)
            n = r.xlen(key)
            undelivered = len(stream_ids(r, key, g["last_delivered"], 1000)) if g else n
            stable, last_len[0] = n == last_len[0], n
            return g is not None and g["pending"] == 0 and undelivered == 0 and stable

        ok = False
        if self.drain if drain is None else drain:
            try:
                ok = bool(wait_for(drained, self.drain_s, 1.0, "the trainer to drain the stream"))
            except WaitTimeout:
                pass
        g = group_info(r, key, group) or {"last_delivered": "0-0"}
        res = audit(read_journal(self.journal), stream_ids(r, key), pending_ids(r, key, group), g["last_delivered"])
        r.close()
        res.update(drained=ok, drain_s=round(time.time() - t0, 1))
        return res


def _finish_report(name: str, load: Load, figures: dict, stream: dict) -> dict:
    out = {"name": name, **load.summary(), "records_lost": stream["records_lost"], **figures, "stream": stream}
    return out


# ---- the scenarios ---------------------------------------------------------------------------------------------
def kill_replica(c: Chaos) -> dict:
    """SIGKILL the engine replica that has requests in flight; Serve starts a replacement."""
    r = c.redis()
    before = wait_for(lambda: len(engine_replicas()) == c.replicas and engine_replicas(), c.recover_s, 0.5,
                      f"{c.replicas} engine replica(s)")
    with c.load("chaos-replica") as load:
        load.wait(lambda l: l.count() >= 1, c.recover_s, "traffic flowing")

        def busy_victim():
            for rid in before:
                raw = r.get(f"{c.cfg.registry.load_key_prefix}:{rid}")
                if raw and json.loads(raw).get("in_flight", 0) > 0:
                    return rid
            return None

        try:
            victim = wait_for(busy_victim, 30, 0.05, "a replica with a request in flight")
        except WaitTimeout:
            victim = next(iter(before))
        t_kill = time.time()
        os.kill(before[victim], signal.SIGKILL)
        c.log(f"kill_replica: SIGKILL replica {victim} (pid {before[victim]})")

        def replaced():
            if running_engine_replicas() != c.replicas:
                return False
            now = engine_replicas()
            return victim not in now and len(now) == c.replicas

        wait_for(replaced, c.recover_s, 0.5, "Serve to replace the killed replica")
        t_rec = time.time()
        c.log(f"kill_replica: replaced after {t_rec - t_kill:.1f} s")
        c.finish(load, t_rec)
    r.close()
    rows = load.snapshot()
    in_flight = [x for x in rows if x.t0 < t_kill < x.t1]
    figures = {"replicas": c.replicas, "recovery_s": round(t_rec - t_kill, 1),
               "in_flight_at_kill": len(in_flight),
               "in_flight_outcomes": {k: sum(1 for x in in_flight if x.outcome == k)
                                      for k in ("completed", "failed", "failed_unclear", "hung")},
               "completed_during_outage": sum(1 for x in rows if x.outcome == "completed" and t_kill < x.t1 < t_rec),
               "completed_after_recovery": sum(1 for x in rows if x.outcome == "completed" and x.t0 >= t_rec)}
    return _finish_report("kill_replica", load, figures, c.drain_and_audit())


def kill_trainer(c: Chaos) -> dict:
    """SIGKILL the trainer's process inside a training step (told by its journal: a ``begin`` without its
    ``applied``); Ray restarts the actor, whose reader takes back the dead one's pending records first."""
    cluster = c.cluster
    r = c.redis()
    key, group = c.cfg.redis.stream_key, c.cfg.trainer.consumer_group
    pid = actor_pid(cluster.trainer)
    mine = f"{pid}-"
    tail = JournalTail(c.journal)

    def own():
        return [e for e in tail.read() if e["i"].startswith(mine)]

    with c.load("chaos-trainer") as load:
        load.wait(lambda l: l.count() >= 1, c.recover_s, "traffic flowing")
        n0 = len([e for e in own() if e["e"] == "applied"])
        wait_for(lambda: len([e for e in own() if e["e"] == "applied"]) > n0, c.recover_s, 0.2,
                 "the trainer to train on this scenario's records")

        def mid_step():
            mine_now = own()
            return bool(mine_now) and mine_now[-1]["e"] == "begin"

        try:
            wait_for(mid_step, 120, 0.01, "the trainer to be inside a step with records pending")
        except WaitTimeout:
            pass  # killed anyway; killed_mid_step says so
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        pending_at_kill = pending_ids(r, key, group)
        last = own()[-1]
        killed_mid_step = last["e"] == "begin"
        in_step = set(last["ids"]) if killed_mid_step else set()
        c.log(f"kill_trainer: SIGKILL pid {pid}, mid-step {killed_mid_step}, {len(pending_at_kill)} pending")

        import ray

        def restarted():
            ray.get(cluster.trainer.state.remote(), timeout=10)
            return actor_pid(cluster.trainer) != pid

        wait_for(restarted, c.recover_s, 0.5, "Ray to restart the trainer actor")
        t_rec = time.time()
        c.log(f"kill_trainer: restarted after {t_rec - t_kill:.1f} s")
        c.finish(load, t_rec)
    later: dict[str, str] = {}

    def reclaimed():
        for e in tail.read()[len(later_seen):]:
            later_seen.append(e)
            if not e["i"].startswith(mine) and e["e"] in ("applied", "held", "skipped", "malformed"):
                for i in e["ids"]:
                    later.setdefault(i, e["e"])
        return pending_at_kill <= set(later)

    later_seen: list[dict] = []
    try:
        wait_for(reclaimed, c.recover_s, 0.2, "the restarted trainer to use the records the dead one left pending")
    except WaitTimeout:
        pass  # pending_reclaimed < pending_at_kill says so
    t_used = time.time()
    stream = c.drain_and_audit()
    r.close()
    figures = {"recovery_s": round(t_rec - t_kill, 1), "reclaimed_s": round(t_used - t_kill, 1),
               "killed_mid_step": killed_mid_step,
               "records_in_killed_step": len(in_step), "pending_at_kill": len(pending_at_kill),
               "pending_reclaimed": len(pending_at_kill & set(later)),
               "killed_step_retrained": len(in_step & {i for i, e in later.items() if e == "applied"})}
    return _finish_report("kill_trainer", load, figures, stream)


def kill_redis(c: Chaos) -> dict:
    """SIGKILL redis-server under load, keep serving for a while, start it again (same port, same AOF)."""
    from onspec.actors.journal import read_journal

    srv = c.cluster.redis
    if srv is None:
        raise WaitTimeout("kill_redis needs the cluster's private redis-server (no --redis-url)")
    key, group = c.cfg.redis.stream_key, c.cfg.trainer.consumer_group
    r = c.redis()
    with c.load("chaos-redis") as load:
        load.wait(lambda l: l.count() >= 2, c.recover_s, "traffic flowing")
        g_before = group_info(r, key, group)
        len_before = r.xlen(key)
        srv.kill()
        t_kill = time.time()
        c.log(f"kill_redis: SIGKILL redis-server ({len_before} entries, group {g_before})")
        # Serving goes on without Redis: wait for requests to complete during the outage (at least redis_down_s).
        load.wait(lambda l: l.count("completed", t_kill) >= 2 and time.time() - t_kill >= c.redis_down_s,
                  c.recover_s, "requests completing while Redis is down")
        completed_down = load.count("completed", t_kill)
        srv.start()
        t_up = time.time()
        c.log(f"kill_redis: redis-server back after {t_up - t_kill:.1f} s down")
        len_after = r.xlen(key)
        g_after = wait_for(lambda: group_info(r, key, group), 30, 0.2, "the consumer group after the restart")

        def new_entry():
            newest = r.xrevrange(key, count=1)
            return newest and int(newest[0][0].decode().split("-")[0]) > t_up * 1000

        wait_for(new_entry, c.recover_s, 0.2, "stream writes to resume")
        t_writes = time.time()

        def trainer_back():
            return any(e["t"] > t_up for e in read_journal(c.journal) if e["e"] in ("applied", "held"))

        wait_for(trainer_back, c.recover_s, 0.2, "the trainer to consume records again")
        t_trainer = time.time()
        c.finish(load, t_writes)
    stream = c.drain_and_audit()
    r.close()
    figures = {"redis_down_s": round(t_up - t_kill, 1), "completed_while_down": completed_down,
               "stream_entries_before_kill": len_before, "stream_entries_after_restart": len_after,
               "group_intact": bool(g_after) and _ge(g_after["last_delivered"], g_before["last_delivered"]),
               "writes_resumed_s": round(t_writes - t_up, 1), "trainer_resumed_s": round(t_trainer - t_up, 1),
               "recovery_s": round(max(t_writes, t_trainer) - t_up, 1)}
    return _finish_report("kill_redis", load, figures, stream)


def _ge(a: str, b: str) -> bool:
    def k(s):
        ms, _, seq = s.partition("-")
        return int(ms), int(seq or 0)
    return k(a) >= k(b)


DONE = {"overwrite": "overwritten", "truncate": "truncated"}


def tamper(path: Path, mode: str) -> None:
    """``overwrite``: 4 KiB of random bytes in the middle (same size); ``truncate``: cut to half."""
    size = path.stat().st_size
    if mode == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(min(4096, size - size // 2)))


def corrupt_checkpoint(c: Chaos) -> dict:
    """A new version's weights are tampered with between its registration and the replicas' load, then it is
    promoted: every replica must refuse it (sha256 differs from the manifest) and keep its drafter. Done once
    with bytes overwritten and once with the file truncated. The trainer is paused meanwhile, so that no
    promotion of its own changes the replicas' drafter; the registry is rolled back afterwards."""
    from onspec.actors.checkpoint import MANIFEST, WEIGHTS
    from onspec.actors.registry import DrafterRegistry

    cluster = c.cluster
    registry = DrafterRegistry.from_url(c.cfg.redis.url, c.cfg.data_dir, c.cfg.registry.prefix)
    cluster.trainer_call("pause")
    tampered: list[str] = []
    try:
        serving = registry.serving()
        src = Path(registry.show(serving)["path"])
        with c.load("chaos-checkpoint") as load:
            load.wait(lambda l: l.count() >= 1, c.recover_s, "traffic flowing")
            before = replica_stats(cluster.url, c.replicas)
            t0 = time.time()
            refuse_s = []
            for mode in ("overwrite", "truncate"):
                version = f"chaos-{mode}-{int(time.time() * 1000)}"
                tmp = Path(tempfile.mkdtemp(prefix="onspec-chaos-"))
                try:
                    shutil.copy2(src / WEIGHTS, tmp / WEIGHTS)
                    manifest = json.loads((src / MANIFEST).read_text())
                    (tmp / MANIFEST).write_text(json.dumps({**manifest, "version": version,
                                                            "parent_version": serving}))
                    registry.register_folder(tmp)  # checked here: its hash matches at registration
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                tamper(Path(registry.show(version)["path"]) / WEIGHTS, mode)
                tampered.append(version)
                t = time.time()
                registry.promote(version, reason=f"chaos: {DONE[mode]} weights")

                def all_refused(n=len(tampered)):
                    stats = replica_stats(cluster.url, c.replicas)
                    return all(s.get("drafter_refused", 0) >= before.get(rid, {}).get("drafter_refused", 0) + n
                               for rid, s in stats.items()) and stats

                wait_for(all_refused, c.recover_s, 0.2, f"every replica to refuse {version}")
                refuse_s.append(round(time.time() - t, 1))
                c.log(f"corrupt_checkpoint: {DONE[mode]} {version} refused by every replica in {refuse_s[-1]} s")
            registry.rollback(serving, reason="chaos: back from the tampered versions")
            for v in tampered:
                registry.record_evaluation(v, {}, rejected_reason="chaos: tampered weights")
            t_rec = time.time()
            c.finish(load, t_rec)
        after = replica_stats(cluster.url, c.replicas)
    finally:
        cluster.trainer_call("resume")
    served_tampered = sum(1 for x in load.snapshot()
                          if x.usage and x.usage.get("drafter_version") in tampered)
    figures = {"tampered_versions": tampered, "refuse_s": refuse_s,
               "replica_versions_before": sorted({s["drafter_version"] for s in before.values()}),
               "replica_versions_after": sorted({s["drafter_version"] for s in after.values()}),
               "refused_per_replica": {rid: s.get("drafter_refused", 0) for rid, s in after.items()},
               "served_by_tampered": served_tampered, "recovery_s": round(t_rec - t0, 1)}
    return _finish_report("corrupt_checkpoint", load, figures, c.drain_and_audit())


RUNNERS = {"kill_replica": kill_replica, "kill_trainer": kill_trainer, "kill_redis": kill_redis,
           "corrupt_checkpoint": corrupt_checkpoint}


def bench_chaos(cfg: OnspecConfig, specs: list[PromptSpec], scenarios: list[str] | None = None,
                requests_per_scenario: int = 16, replicas: int = 2, clients: int = 3, max_tokens: int = 16,
                timeout_s: float = 120.0, redis_down_s: float = 10.0, port: int | None = None,
                log=lambda *_: None) -> dict:
    scenarios = list(scenarios or SCENARIOS)
    unknown = [s for s in scenarios if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    work = Path(tempfile.mkdtemp(prefix="onspec-chaos-"))
    t0 = time.time()
    log(f"starting the cluster ({replicas} replica(s), trainer, private redis-server) in {work}")
    cluster, journal = start_chaos_cluster(cfg, work, replicas, port)
    report = {"replicas": replicas, "clients": clients, "max_tokens": max_tokens, "timeout_s": timeout_s,
              "requests_per_scenario": requests_per_scenario, "scenarios": []}
    try:
        log(f"up after {time.time() - t0:.0f} s at {cluster.url}")
        c = Chaos(cluster, journal, specs, cfg.server.served_model_name or cfg.model.name, replicas, clients,
                  max_tokens, timeout_s, requests_per_scenario, redis_down_s=redis_down_s,
                  api_key=first_api_key(cluster.cfg), log=log)
        report["warmup_s"] = c.warm_up()
        log(f"warmed up in {report['warmup_s']} s")
        for name in scenarios:
            t = time.time()
            log(f"scenario {name}")
            try:
                res = RUNNERS[name](c)
            except WaitTimeout as e:  # the service did not recover in time: that is the finding
                res = {"name": name, "sent": 0, "completed": 0, "failed": 0, "hung": 0, "records_lost": 0,
                       "error": str(e)}
            res["wall_s"] = round(time.time() - t, 1)
            log(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'stream'})}")
            report["scenarios"].append(res)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.time() - t0, 1)
    report["ok"] = all(s["hung"] == 0 and s["records_lost"] == 0 and "error" not in s for s in report["scenarios"])
    return report


def format_report(report: dict) -> str:
    cols = ("sent", "completed", "failed", "hung", "records_lost", "recovery_s")
    lines = [f"{'scenario':20s} " + " ".join(f"{c:>12s}" for c in cols)]
    for s in report["scenarios"]:
        lines.append(f"{s['name']:20s} " + " ".join(f"{str(s.get(c, '-')):>12s}" for c in cols)
                     + (f"  ERROR: {s['error']}" if s.get("error") else ""))
    lines.append("ok" if report["ok"] else "FAILED: a request hung, a record was lost or a recovery timed out")
    return "\n".join(lines)
