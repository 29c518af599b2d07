"""The drafter registry: every drafter version is a checkpoint folder under ``<data_dir>/drafters/<version>``
(actors/checkpoint.py: safetensors + manifest with sha256 and parent) and a record in Redis.

Redis keys (``prefix`` defaults to ``onspec:drafters``):
  {prefix}:seq           counter behind the version names v1, v2, ...
  {prefix}:index         sorted set: version -> creation time
  {prefix}:meta:{v}      hash: manifest (JSON), path, status, reason, evaluation (JSON), updated
  {prefix}:serving       the version every replica should serve
  {prefix}:history       list (JSON entries): every change of the serving version, oldest first
  {prefix}:events        pub/sub channel: one message per change of the serving version
  {prefix}:claim:{v}     held (with a TTL) while a version's files are written

Status of a version: ``candidate`` (registered, not serving), ``rejected`` (failed the promotion gate: the reason
says by how much), ``serving``, ``retired`` (served before). Promotion, rollback and the initial drafter change
the serving key, the statuses and the history in one MULTI/EXEC transaction, so a replica polling the key never
sees a version that the history does not know.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import redis
from onspec.actors.checkpoint import (
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from onspec.actors.models import sha256_file

DEFAULT_PREFIX = "onspec:drafters"
STATUSES = ("candidate", "rejected", "serving", "retired")
# A version names a folder under data_dir: no separators, no leading dot (temporary folders start with one).
VERSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
CLAIM_TTL_S = 600  # a registration that died half-way frees its version after this long


class RegistryError(ValueError):
    """An unknown version, or an operation the registry's state does not allow (message says which)."""


def _text(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise RegistryError(f"invalid drafter version {version!r}: 1-64 letters, digits, '_', '.' or '-', "
                            "not starting with '.' or '-'")
    return version


class DrafterRegistry:
    def __init__(self, client: redis.Redis, data_dir: Path | str, prefix: str = DEFAULT_PREFIX):
        self.r = client
        self.root = Path(data_dir) / "drafters"
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, data_dir: Path | str, prefix: str = DEFAULT_PREFIX,
                 timeout_s: float = 5.0) -> DrafterRegistry:
        return cls(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s),
                   data_dir, prefix)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---- registering ------------------------------------------------------------------------------------------
    def next_version(self) -> str:
        while True:  # skip names taken by explicit registrations (register(..., version="v3"))
            version = f"v{self.r.incr(self._k('seq'))}"
            if not self.r.exists(self._k("meta", version)):
                return version

    def register(self, drafter, parent: str | None, version: str | None = None, extra: dict | None = None) -> dict:
        """Save ``drafter`` as a new candidate version (files first, then metadata: a version listed in Redis
        always has its files). Returns the manifest."""
        version = check_version(version or self.next_version())
        with self._claim(version):
            tmp = self._tmp_dir(version)
            try:
                manifest = save_checkpoint(drafter, tmp, version, parent, extra)
                self._install(tmp, version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._add(version, manifest, self.root / version)
        return manifest

    def register_folder(self, folder: Path | str) -> dict:
        """Register an existing checkpoint folder (e.g. an offline-distilled drafter) under its own version."""
        manifest = read_manifest(folder)
        version = check_version(manifest["version"])
        if self.r.exists(self._k("meta", version)):
            return self.show(version)["manifest"]
        weights = Path(folder) / WEIGHTS
        # Refused here rather than at the first replica's load: a bad folder never becomes a version.
        if not weights.is_file() or sha256_file(weights) != manifest["sha256"]:
            raise RegistryError(f"{folder}: {WEIGHTS} is missing or does not match the manifest's sha256")
        dest = self.root / version
        with self._claim(version):
            if Path(folder).resolve() != dest.resolve():
                tmp = self._tmp_dir(version)
                try:
                    shutil.copytree(folder, tmp, dirs_exist_ok=True)
                    self._install(tmp, version)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            self._add(version, manifest, dest)
        return manifest

    @contextlib.contextmanager
    def _claim(self, version: str):
        """Holds ``{prefix}:claim:{v}`` while a version's files are written, so that two processes registering
        the same version (replicas starting together) never write one folder at once."""
        key = self._k("claim", version)
        if not self.r.set(key, "1", nx=True, ex=CLAIM_TTL_S):
            raise RegistryError(f"drafter version {version} is being registered by another process")
        try:
            if self.r.exists(self._k("meta", version)):  # checked after claiming: no window in between
                raise RegistryError(f"drafter version {version} is already registered")
            yield
        finally:
            self.r.delete(key)

    def _tmp_dir(self, version: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=f".{version}-"))

    def _install(self, tmp: Path, version: str) -> None:
        # A folder without metadata is the leftover of a registration that died; it is replaced.
        folder = self.root / version
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def _add(self, version: str, manifest: dict, folder: Path) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("meta", version), mapping={
            "manifest": json.dumps(manifest), "path": str(folder.resolve()), "status": "candidate", "reason": "",
            "evaluation": "{}", "updated": time.time()})
        pipe.zadd(self._k("index"), {version: manifest.get("created", time.time())})
        pipe.execute()

    def ensure_registered(self, drafter, serve_if_none: bool = True, wait_s: float = 120.0) -> str:
        """Make the drafter a replica starts with (``drafter.version``, e.g. "base") a registered version, so
        that a rollback can return to it; it becomes the serving version when none is set yet."""
        version = check_version(getattr(drafter, "version", None) or "base")
        if not self.r.exists(self._k("meta", version)):
            try:
                self.register(drafter, parent=None, version=version)
            except RegistryError:  # another process is registering it: serve it only once its files are in
                self._wait_registered(version, wait_s)
        if serve_if_none:
            self._switch(version, "initial drafter", "init", only_if_none=True)
        return version

    def _wait_registered(self, version: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not self.r.exists(self._k("meta", version)):
            if time.monotonic() > deadline:
                raise RegistryError(f"drafter version {version} was not registered within {wait_s:.0f} s "
                                    "by the process registering it")
            time.sleep(0.05)

    # ---- reading ---------------------------------------------------------------------------------------------
    def serving(self) -> str | None:
        return _text(self.r.get(self._k("serving")))

    def versions(self) -> list[str]:
        return [_text(v) for v in self.r.zrange(self._k("index"), 0, -1)]

    def show(self, version: str) -> dict:
        raw = self.r.hgetall(self._k("meta", version))
        if not raw:
            raise RegistryError(f"unknown drafter version {version!r} (known: {', '.join(self.versions()) or 'none'})")
        meta = {_text(k): _text(v) for k, v in raw.items()}
        manifest = json.loads(meta["manifest"])
        return {"version": version, "parent_version": manifest.get("parent_version"), "status": meta["status"],
                "reason": meta["reason"], "evaluation": json.loads(meta.get("evaluation") or "{}"),
                "path": meta["path"], "sha256": manifest["sha256"], "created": manifest.get("created"),
                "updated": float(meta.get("updated") or 0), "pruned": meta.get("pruned") == "1",
                "manifest": manifest}

    def list(self) -> list[dict]:
        return [self.show(v) for v in self.versions()]

    def history(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self._k("history"), 0, -1)]

    def load(self, version: str, target):
        """The drafter of ``version`` on the target's device (sha256 verified by load_checkpoint)."""
        info = self.show(version)
        try:
            drafter, _ = load_checkpoint(info["path"], target)
        except CheckpointError as e:
            raise RegistryError(f"drafter version {version}: {e}") from None
        return drafter

    # ---- decisions -------------------------------------------------------------------------------------------
    def record_evaluation(self, version: str, evaluation: dict, rejected_reason: str | None = None) -> None:
        self.show(version)  # unknown version: RegistryError
        mapping = {"evaluation": json.dumps(evaluation), "updated": time.time()}
        if rejected_reason is not None:
            mapping.update(status="rejected", reason=rejected_reason)
        self.r.hset(self._k("meta", version), mapping=mapping)

    def promote(self, version: str, reason: str = "promoted by an operator", action: str = "promote") -> dict:
        """Make ``version`` the serving drafter on every replica (they poll the serving key)."""
        if self._meta(version).get("pruned") == "1":
            raise RegistryError(f"drafter version {version} was a rejected candidate whose files were pruned")
        self.show(version)
        return self._switch(version, reason, action)

    def _switch(self, version: str, reason: str, action: str, only_if_none: bool = False) -> dict:
        serving = self._k("serving")
        # WATCH the serving key: two concurrent promotions cannot both record the same predecessor.
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(serving)
                    previous = _text(pipe.get(serving))
                    if previous == version or (only_if_none and previous is not None):
                        pipe.unwatch()
                        return {"version": previous, "previous": previous, "changed": False}
                    now = time.time()
                    entry = {"version": version, "previous": previous, "reason": reason, "action": action,
                             "at": now}
                    pipe.multi()
                    pipe.set(serving, version)
                    pipe.hset(self._k("meta", version), mapping={"status": "serving", "reason": reason,
                                                                  "updated": now})
                    if previous is not None:
                        pipe.hset(self._k("meta", previous), mapping={"status": "retired", "updated": now})
                    pipe.rpush(self._k("history"), json.dumps(entry))
                    pipe.publish(self._k("events"), json.dumps(entry))
                    pipe.execute()
                    return {**entry, "changed": True}
                except redis.WatchError:
                    continue

    def prune(self, keep_rejected: int = 3) -> list[str]:
        """Delete the files of rejected candidates but the newest ``keep_rejected`` (a trainer registers one every
        few minutes, forever); their metadata and evaluation stay, marked ``pruned``. Serving and retired
        versions are kept: they are what a rollback returns to. Returns the versions pruned."""
        rejected = [v for v in self.versions() if self._meta(v).get("status") == "rejected"
                    and self._meta(v).get("pruned") != "1"]
        pruned = []
        for version in rejected[:max(0, len(rejected) - keep_rejected)]:
            shutil.rmtree(self.root / version, ignore_errors=True)
            self.r.hset(self._k("meta", version), mapping={"pruned": "1", "updated": time.time()})
            pruned.append(version)
        return pruned

    def _meta(self, version: str) -> dict:
        return {_text(k): _text(v) for k, v in self.r.hgetall(self._k("meta", version)).items()}

    def rollback(self, version: str | None = None, reason: str | None = None) -> dict:
        """Serve ``version`` again, or (None) the version that served before the current one."""
        current = self.serving()
        if version is None:
            if current is None:
                raise RegistryError("nothing to roll back to: no drafter version is serving yet")
            # The predecessor from when the current version was promoted (not from a rollback to it), so
            # repeated rollbacks walk back through the promotions.
            earlier = [h["previous"] for h in reversed(self.history())
                       if h["version"] == current and h.get("previous") and h["action"] != "rollback"]
            if not earlier:
                raise RegistryError(f"nothing to roll back to: {current} is the first serving drafter")
            version = earlier[0]
        return self.promote(version, reason or f"rollback from {current}", action="rollback")
