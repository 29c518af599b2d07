"""`onspec bench online`: the whole loop. Starts the cluster (replicas, Redis, the trainer), replays each
phase file's prompts as live HTTP traffic for a few minutes while the trainer learns from the stream, and
measures each phase at its start and end on a fixed slice of that phase's prompts (held out of the traffic):

  acceptance   drafted tokens the target accepted, drafting a fixed ``accept_k`` tokens every round (so the
               figure does not depend on how many drafts the draft-length policy chose to make)
  speedup      speculative (the default policy) vs target-only tokens/s, the two interleaved prompt by prompt

Measurements run in this process with the serving version loaded from the registry, while the trainer is
paused and no traffic flows, so they are not disturbed by the loop they measure.
"""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx

from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec, read_prompts
from onspec.cluster.bench.common import request_for


def _request(client: httpx.Client, url: str, model: str, spec: PromptSpec, max_tokens: int, label: str) -> dict:
    path, body = request_for(spec, model=model, max_tokens=max_tokens, temperature=0, label=label)
    r = client.post(url + path, json=body)
    r.raise_for_status()
    return r.json()["usage"]


class Traffic:
    """Closed-loop clients replaying prompts over HTTP, each pausing a random think time between requests."""

    def __init__(self, url: str, model: str, specs: list[PromptSpec], max_tokens: int, clients: int,
                 think_s: float, label: str, seed: int = 0):
        self.url, self.model, self.specs, self.max_tokens = url, model, specs, max_tokens
        self.think_s, self.label = think_s, label
        self.stop = threading.Event()
        self.usage = {"requests": 0, "completion_tokens": 0, "drafted": 0, "accepted": 0, "errors": 0}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(seed + i,), daemon=True) for i in range(clients)]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        order = list(self.specs)
        with httpx.Client(timeout=600) as client:
            while not self.stop.is_set():
                rng.shuffle(order)
                for spec in order:
                    if self.stop.is_set():
                        return
                    try:
                        u = _request(client, self.url, self.model, spec, self.max_tokens, self.label)
                        with self._lock:
                            self.usage["requests"] += 1
                            self.usage["completion_tokens"] += u["completion_tokens"]
                            self.usage["drafted"] += u["drafted_tokens"]
                            self.usage["accepted"] += u["accepted_tokens"]
                    except httpx.HTTPError:
                        with self._lock:
                            self.usage["errors"] += 1
                    self.stop.wait(rng.expovariate(1 / self.think_s) if self.think_s > 0 else 0)

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=600)


def measure(engine, specs: list[PromptSpec], max_tokens: int, accept_k: int) -> dict:
    """Acceptance at a fixed draft length, and speculative vs target-only tokens/s side by side."""
    from onspec.actors.requests import SamplingParams
    from onspec.cluster.bench.decode import bench_decode

    speed = bench_decode(engine, specs, max_tokens)
    spec_cfg = engine.spec
    # The drafter model's own acceptance: what training moves (suffix drafts are measured in the speedup).
    engine.spec = engine.controller.cfg = spec_cfg.model_copy(update={"mode": "fixed", "fixed_k": accept_k,
                                                                      "source": "model"})
    try:
        drafted = accepted = 0
        for s in specs:
            g = engine.generate(engine.encode(s.prompt, s.messages), SamplingParams(max_tokens=max_tokens))
            drafted, accepted = drafted + g.stats.drafted, accepted + g.stats.accepted
    finally:
        engine.spec = engine.controller.cfg = spec_cfg
        engine.controller.reset()
    return {"acceptance": round(accepted / drafted, 4) if drafted else 0.0, "speedup": speed["speedup"],
            "spec_tokens_per_s": speed["spec_tokens_per_s"], "target_tokens_per_s": speed["target_tokens_per_s"],
            "identical": speed["identical"], "policy_acceptance": speed["acceptance_rate"],
            "tokens_per_step": speed.get("tokens_per_step"),
            "drafter_cost_per_token_ms": speed.get("drafter_cost_per_token_ms"),
            "drafter_cost_ratio": speed.get("drafter_cost_ratio"), "drafter_kind": getattr(engine.drafter, "kind", None),
            "drafter_version": getattr(engine.drafter, "version", None),
            "by_source": next(iter(speed["sources"].values()))["by_source"]}


def bench_online(cfg: OnspecConfig, phases: list[Path], minutes_per_phase: float = 10.0, eval_prompts: int = 3,
                 max_tokens: int = 64, clients: int = 1, think_s: float = 1.0, accept_k: int = 4,
                 sample_every_s: float = 30.0, p99_requests: int = 8, log=lambda *_: None) -> dict:
    from onspec.actors.engine import SpeculativeEngine
    from onspec.actors.registry import DrafterRegistry
    from onspec.cluster.serve import Cluster
    from onspec.actors.suffix_share import load_index

    sets = []
    for path in phases:
        specs = read_prompts(path)
        if len(specs) < eval_prompts + 1:
            raise ValueError(f"{path}: {len(specs)} prompts; a phase needs more than --eval-prompts "
                             f"({eval_prompts}) so that some are left for traffic")
        sets.append((Path(path), specs[:eval_prompts], specs[eval_prompts:]))
    cfg = cfg.merged(**{"trainer.enabled": True, "stream.enabled": True})
    engine = SpeculativeEngine.from_config(cfg)
    engine.calibrate()
    model = cfg.server.served_model_name or cfg.model.name
    cluster = Cluster(cfg).start()
    registry = DrafterRegistry.from_url(cluster.cfg.redis.url, cluster.cfg.data_dir, cfg.registry.prefix)
    report = {"minutes_per_phase": minutes_per_phase, "eval_prompts": eval_prompts, "max_tokens": max_tokens,
              "clients": clients, "think_s": think_s, "accept_k": accept_k, "phases": []}
    t_start = time.time()

    def measure_serving(eval_specs) -> dict:
        cluster.trainer_call("pause")
        try:
            version = registry.serving()
            if version and version != getattr(engine.drafter, "version", None):
                engine.set_drafter(registry.load(version, engine.target))
            if cfg.speculation.source != "model":  # what the replicas' suffix indexes hold by now
                engine.suffix_index = load_index(registry.r, cfg.suffix)
            return measure(engine, eval_specs, max_tokens, accept_k)
        finally:
            cluster.trainer_call("resume")

    try:
        for path, eval_specs, traffic_specs in sets:
            log(f"phase {path.name}: measuring the start")
            start = measure_serving(eval_specs)
            log(f"phase {path.name} start: {json.dumps(start)}")
            state0 = cluster.trainer_call("state")
            curve = []
            t0 = time.time()
            with Traffic(cluster.url, model, traffic_specs, max_tokens, clients, think_s, path.stem) as traffic:
                while time.time() - t0 < minutes_per_phase * 60:
                    time.sleep(min(sample_every_s, max(0.0, minutes_per_phase * 60 - (time.time() - t0))))
                    st = cluster.trainer_call("state")
                    u = dict(traffic.usage)
                    point = {"t_s": round(time.time() - t0), "serving_version": st["serving_version"],
                             "steps": st["steps"], "onpolicy_steps": st["onpolicy_steps"],
                             "records_acked": st["records_acked"], "requests": u["requests"],
                             "traffic_acceptance": round(u["accepted"] / u["drafted"], 4) if u["drafted"] else None,
                             "last_eval_gate": (st.get("last_eval") or {}).get("candidate", {}).get("gate"),
                             "steps_per_min": st.get("steps_per_min"),
                             "tokens_supervised_per_min": st.get("tokens_supervised_per_min"),
                             "record_wait_p50_s": st.get("record_wait_p50_s")}
                    curve.append(point)
                    log(f"  {json.dumps(point)}")
            end = measure_serving(eval_specs)
            state1 = cluster.trainer_call("state")
            promoted = state1["promoted"][len(state0["promoted"]):]
            minutes = max((time.time() - t0) / 60, 1e-9)
            trainer = {k: state1[k] - state0[k] for k in ("steps", "record_steps", "onpolicy_steps",
                                                          "records_acked", "candidates", "tokens_supervised")}
            trainer.update(steps_per_min=round(trainer["steps"] / minutes, 2),
                           tokens_supervised_per_min=round(trainer["tokens_supervised"] / minutes, 1),
                           record_wait_p50_s=state1.get("record_wait_p50_s"),
                           record_wait_max_s=state1.get("record_wait_max_s"))
            row = {"phase": str(path), "acceptance_start": start["acceptance"], "acceptance_end": end["acceptance"],
                   "speedup_start": start["speedup"], "speedup_end": end["speedup"], "versions_promoted": promoted,
                   "start": start, "end": end, "traffic": traffic.usage, "curve": curve, "trainer": trainer,
                   "promotions": _promotions(registry, promoted)}
            log(f"phase {path.name} end: {json.dumps(end)}")
            report["phases"].append(row)
        if p99_requests:
            report["serving_with_trainer"] = _p99_with_and_without_trainer(cluster, model, sets[-1][2],
                                                                           p99_requests, max_tokens, log)
    finally:
        cluster.stop()
    report["wall_s"] = round(time.time() - t_start)
    return report


def _promotions(registry, versions: list[str]) -> list[dict]:
    """Each promoted version's gate figure next to its predecessor's on the same held-back windows."""
    out = []
    for v in versions:
        ev = registry.show(v).get("evaluation") or {}
        out.append({"version": v, "gate": (ev.get("candidate") or {}).get("gate"),
                    "predecessor": ev.get("serving_version"), "predecessor_gate": (ev.get("serving") or {}).get("gate")})
    return out


def _p99_with_and_without_trainer(cluster, model: str, specs: list[PromptSpec], requests: int, max_tokens: int,
                                  log) -> dict:
    """The same greedy load (2 concurrent clients) with the trainer paused and running, alternated twice so
    that drift in the machine's load hits both alike: does the trainer really yield to serving?"""
    import asyncio

    from onspec.cluster.bench.common import percentile
    from onspec.cluster.bench.serve import run_load

    lat = {"paused": [], "running": []}
    tps = {"paused": [], "running": []}
    for mode in ("paused", "running") * 2:
        cluster.trainer_call("pause" if mode == "paused" else "resume")
        res = asyncio.run(run_load(cluster.url, model, specs, 2, requests, max_tokens))
        log(f"  trainer {mode}: p99 {res['latency_p99_s']} s, {res['tokens_per_s']} tok/s")
        lat[mode].append(res["latency_p99_s"])
        tps[mode].append(res["tokens_per_s"])
    cluster.trainer_call("resume")
    p99 = {m: round(percentile(v, 50), 3) for m, v in lat.items()}
    return {"latency_p99_s": p99, "tokens_per_s": {m: round(sum(v) / len(v), 3) for m, v in tps.items()},
            "p99_increase_pct": round((p99["running"] / p99["paused"] - 1) * 100, 2) if p99["paused"] else None,
            "requests_per_run": requests, "runs": lat}


def format_report(report: dict) -> str:
    lines = [f"{'phase':28s} {'acc start':>9s} {'acc end':>8s} {'speedup start':>13s} {'speedup end':>11s} "
             f"{'steps/min':>9s} {'tokens/min':>10s} {'wait p50':>8s}  promoted"]
    for p in report["phases"]:
        t = p["trainer"]
        wait = "-" if t.get("record_wait_p50_s") is None else f"{t['record_wait_p50_s']:.1f}s"
        lines.append(f"{Path(p['phase']).name:28s} {p['acceptance_start']:>9.3f} {p['acceptance_end']:>8.3f} "
                     f"{p['speedup_start']:>13.3f} {p['speedup_end']:>11.3f} {t.get('steps_per_min', 0):>9.1f} "
                     f"{t.get('tokens_supervised_per_min', 0):>10.0f} {wait:>8s}  {', '.join(p['versions_promoted'])}")
    if report.get("serving_with_trainer"):
        w = report["serving_with_trainer"]
        lines.append(f"serving p99 latency: trainer paused {w['latency_p99_s']['paused']} s, running "
                     f"{w['latency_p99_s']['running']} s ({w['p99_increase_pct']:+.1f}%)")
    return "\n".join(lines)
