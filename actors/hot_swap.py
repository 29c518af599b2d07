"""A replica's link to the drafter registry: it follows the serving version and reports the replica's load.

A background thread polls ``{registry prefix}:serving`` (polling rather than pub/sub: it needs no connection
kept open across Redis restarts, and a replica that starts late or missed a message still converges). When the
version differs from the engine's, it loads that checkpoint (sha256 verified) off the decoding thread and hands
it to ``engine.swap_drafter``; the engine takes it between verification rounds. Output stays the target's
either way: a swap can only change speed, never text.

The same thread writes the replica's in-flight request count to ``{load prefix}:{replica_id}`` with a TTL, which
is how the trainer knows when serving is busy.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import redis
import torch

from onspec.actors.registry import DrafterRegistry, RegistryError

log = logging.getLogger("onspec.hot_swap")


class DrafterWatcher:
    def __init__(self, registry: DrafterRegistry, engine, replica_id: str, load: Callable[[], dict],
                 poll_interval_s: float = 1.0, load_key_prefix: str = "onspec:load", load_ttl_s: float = 5.0,
                 apply: Callable[[], None] | None = None):
        self.registry, self.engine, self.replica_id, self.load = registry, engine, replica_id, load
        self.apply = apply  # asks the decoding thread to take the new drafter now rather than at its next round
        self.poll_interval_s = poll_interval_s
        self.load_key = f"{load_key_prefix}:{replica_id}"
        self.load_ttl_ms = int(load_ttl_s * 1000)
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded (not retried)
        self.refused = 0  # versions refused (tampered, truncated, missing files): the old drafter kept serving
        self.loaded = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="onspec-drafter-watcher", daemon=True)

    def start(self) -> "DrafterWatcher":
        self._thread.start()
        return self

    def poke(self) -> None:
        """Check now instead of at the next poll (a request started or ended: the load changed)."""
        self._wake.set()

    def current(self) -> str | None:
        pending = self.engine._next_drafter
        return getattr(pending if pending is not None else self.engine.drafter, "version", None)

    def check_once(self) -> str | None:
        """Publish the load; start loading the serving version if it differs. Returns the version taken."""
        r = self.registry.r
        r.set(self.load_key, json.dumps({**self.load(), "ts": time.time()}), px=self.load_ttl_ms)
        version = self.registry.serving()
        if version is None or version == self.current() or version in self.failed:
            return None
        try:
            drafter = self.registry.load(version, self.engine.target)
        except RegistryError as e:
            self.failed[version] = str(e)
            self.refused += 1
            log.error("cannot serve drafter %s, keeping %s: %s", version, self.current(), e)
            return None
        self.engine.swap_drafter(drafter)
        if self.apply is not None:
            self.apply()
        self.loaded += 1
        log.info("drafter %s loaded; the engine takes it before its next round", version)
        return version

    def _run(self) -> None:
        # Loading a drafter here runs torch's parallel ops. Given a second OpenMP team (this thread's), libgomp
        # stops spinning its workers between parallel regions once more threads than cores are in teams, and
        # the decoding thread's forwards then ran ~3x slower for the rest of the process's life (BENCHMARKS.md,
        # "a second OpenMP team"). On one thread this thread starts no team. (torch's setting is process-wide
        # for threads that start after it: in a replica only the decoding thread should run parallel work.)
        torch.set_num_threads(1)
        while not self._stop.is_set():
            try:
                self.check_once()
            except (redis.RedisError, OSError) as e:
                log.warning("drafter registry unreachable: %s", e)
            except Exception:  # never let the watcher die: serving goes on with the drafter it has
                log.exception("drafter watcher")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        try:
            self.registry.r.delete(self.load_key)
        except (redis.RedisError, OSError):
            pass


def serving_load(client: redis.Redis, load_key_prefix: str = "onspec:load") -> dict:
    """The replicas' reports summed: {"replicas", "in_flight", "queued"} (expired reports are gone)."""
    total = {"replicas": 0, "in_flight": 0, "queued": 0}
    keys = list(client.scan_iter(match=f"{load_key_prefix}:*", count=100))
    for raw in client.mget(keys) if keys else []:
        if raw is None:
            continue
        rep = json.loads(raw)
        total["replicas"] += 1
        total["in_flight"] += int(rep.get("in_flight", 0))
        total["queued"] += int(rep.get("queued", 0))
    return total
