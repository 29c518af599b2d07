"""Probes of a running cluster's processes and of its stream's consumer group, for the fault benches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import redis

from onspec.cluster.bench.common import wait_for

ENGINE_ACTOR_PREFIX = "SERVE_REPLICA::onspec#onspec-engine#"


# ---- the cluster's processes -----------------------------------------------------------------------------------
def _pid(_actor) -> int:
    return os.getpid()


def actor_pid(handle, timeout: float = 15.0) -> int:
    """The OS process of a Ray actor (Ray's state API needs the dashboard, which the local cluster leaves out)."""
    import ray

    return ray.get(handle.__ray_call__.remote(_pid), timeout=timeout)


def engine_replicas(timeout: float = 15.0) -> dict[str, int]:
    """{Serve replica id: pid} of the engine replicas now alive."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith(ENGINE_ACTOR_PREFIX):
            try:
                out[a["name"][len(ENGINE_ACTOR_PREFIX):]] = actor_pid(ray.get_actor(a["name"], namespace="serve"),
                                                                       timeout)
            except Exception:  # noqa: BLE001 -- dead or still starting
                continue
    return out


def running_engine_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("onspec")
    dep = app.deployments.get("onspec-engine") if app else None
    return int((dep.replica_states or {}).get("RUNNING", 0)) if dep else 0


def replica_stats(url: str, replicas: int, timeout: float = 60.0) -> dict[str, dict]:
    """{replica id: stats} for ``replicas`` distinct engine replicas, sampled through /readyz (each answer comes
    from whichever replica the router picked)."""
    seen: dict[str, dict] = {}

    def probe():
        r = httpx.get(url + "/readyz", timeout=10).json()
        rep = r.get("replica")
        if rep and rep.get("replica_id"):
            seen[rep["replica_id"]] = rep
        return len(seen) >= replicas

    wait_for(probe, timeout, 0.05, f"/readyz answers from {replicas} replica(s)")
    return seen


# ---- the consumer group vs the journal -------------------------------------------------------------------------
def group_info(r: redis.Redis, key: str, group: str) -> dict | None:
    for g in r.xinfo_groups(key):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            last = g["last-delivered-id"]
            return {"pending": int(g["pending"]), "consumers": int(g["consumers"]),
                    "last_delivered": last.decode() if isinstance(last, bytes) else last}
    return None


def stream_ids(r: redis.Redis, key: str, start: str = "-", chunk: int = 5000) -> list[str]:
    out = []
    while True:
        got = r.xrange(key, min=start, max="+", count=chunk)
        ids = [i.decode() if isinstance(i, bytes) else i for i, _ in got]
        if start != "-" and ids and ids[0] == start:
            ids = ids[1:]
        out.extend(ids)
        if len(got) < chunk:
            return out
        start = out[-1]


def pending_ids(r: redis.Redis, key: str, group: str) -> set[str]:
    rows = r.xpending_range(key, group, "-", "+", 1_000_000)
    return {(e["message_id"].decode() if isinstance(e["message_id"], bytes) else e["message_id"]) for e in rows}


class JournalTail:
    """The journal read incrementally (polled every few ms while waiting for the trainer to be mid-step)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.entries = Path(path), 0, []

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.entries
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        for line in data[:end].splitlines():
            try:
                self.entries.append(json.loads(line))
            except ValueError:
                continue  # cut short by a crash
        self.offset += end
        return self.entries
