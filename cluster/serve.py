"""Ray Serve wiring: two thin deployments over the plain classes.

  onspec-engine  N replicas, each a Replica (actors/replica.py): the engine and its stream logger
  onspec-api     the FastAPI ingress (cluster/api/); it reaches the engine replicas through a handle

The ingress is separate so that parsing, refusals, /metrics and /readyz never wait behind a generation, and so
that its metrics cover all traffic. ``Cluster`` starts everything (Ray, the private Redis, the app) and stops it
in reverse order; ``onspec serve`` and the tests use it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from pathlib import Path

from onspec.actors.config import OnspecConfig

APP_NAME = "onspec"
log = logging.getLogger("onspec.serve")


class HandleBackend:
    """cluster/api/app.py's backend over a DeploymentHandle to the engine deployment."""

    def __init__(self, handle):
        self.handle = handle

    async def complete(self, req: dict) -> dict:
        resp = self.handle.complete.remote(req)
        try:
            return await resp
        except BaseException:
            resp.cancel()  # the client left (or the ingress is stopping): stop generating
            raise

    async def stream(self, req: dict):
        gen = self.handle.options(stream=True).stream.remote(req)
        done = False
        try:
            async for ev in gen:
                done = ev["type"] in ("end", "error")
                yield ev
        finally:
            if not done:
                gen.cancel()  # reaches the replica's generator as CancelledError: the slot is freed

    async def ready(self) -> dict:
        return await self.handle.ready.remote()

    async def tokenize(self, req: dict) -> dict:
        return await self.handle.tokenize.remote(req)

    async def detokenize(self, req: dict) -> dict:
        return await self.handle.detokenize.remote(req)

    async def stats(self) -> dict:
        return await self.handle.stats.remote()

    async def trainer(self) -> dict | None:
        """The trainer actor's state, or None when there is none (it is started under a fixed name)."""
        import ray

        try:
            actor = ray.get_actor("onspec-trainer")
        except ValueError:
            return None
        try:
            return await asyncio.wait_for(actor.state.remote(), 10.0)
        except Exception:  # noqa: BLE001 -- a trainer that does not answer is as good as none here
            return None


class EngineDeployment:
    def __init__(self, cfg: dict):
        from onspec.actors.replica import Replica
        from onspec.actors.stream_logger import StreamLogger, encode_record

        self.cfg = OnspecConfig.model_validate(cfg)
        logger = None
        if self.cfg.redis.url:
            logger = StreamLogger.from_config(self.cfg, encode=lambda item: encode_record(*item))
        from ray import serve

        rid = serve.get_replica_context().replica_id.unique_id
        self.replica = Replica(self.cfg, logger=logger, replica_id=rid)
        if self.cfg.redis.url:
            self.replica.watcher = _watcher(self.cfg, self.replica).start()
        if self.cfg.redis.url and self.cfg.suffix.share and self.cfg.speculation.source != "model":
            from onspec.actors.suffix_share import SuffixSharer
            self.replica.share_suffixes(SuffixSharer.from_config(
                self.cfg.redis.url, self.cfg.suffix, rid, self.replica.engine.suffix_inbox.append).start())
        self.metrics = _RayMetrics()

    def reconfigure(self, user_config: dict) -> None:
        # Only a switch, never weights (conventions: user_config is for small settings).
        if "stream_enabled" in user_config:
            self.replica.set_stream_enabled(bool(user_config["stream_enabled"]))
        if "speculate" in user_config:  # off: target-only decoding (bench serve's baseline)
            self.replica.speculate = bool(user_config["speculate"])

    async def complete(self, req: dict) -> dict:
        res = await self.replica.acomplete(req)
        if res["type"] == "result":
            self._count(req, res)
        return res

    async def stream(self, req: dict):
        async for ev in self.replica.astream(req):
            if ev["type"] == "end":
                self._count(req, ev)
            yield ev

    def _count(self, req: dict, ev: dict) -> None:
        try:
            self.metrics.finished(req.get("label"), ev["usage"], ev["replica"])
        except Exception:  # metrics must never fail a request
            log.exception("recording replica metrics failed")

    async def ready(self) -> dict:
        return await self.replica.aready()

    async def tokenize(self, req: dict) -> dict:
        return self.replica.tokenize(req)

    async def detokenize(self, req: dict) -> dict:
        return self.replica.detokenize(req)

    async def stats(self) -> dict:
        return self.replica.stats()

    def __del__(self):
        # Serve calls this on a graceful replica shutdown: write what the logger still holds.
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()


def _watcher(cfg: OnspecConfig, replica):
    """Follow the registry's serving drafter and publish the replica's load (actors/hot_swap.py)."""
    from onspec.actors.hot_swap import DrafterWatcher
    from onspec.actors.registry import DrafterRegistry

    reg = DrafterRegistry.from_url(cfg.redis.url, cfg.data_dir, cfg.registry.prefix)
    return DrafterWatcher(reg, replica.engine, replica.replica_id, replica.load, cfg.registry.poll_interval_s,
                          cfg.registry.load_key_prefix, cfg.registry.load_ttl_s, apply=replica.apply_pending_swap)


class _RayMetrics:
    """The same figures as the ingress's /metrics, kept per replica with Ray's metrics API: Ray tags them with
    deployment and replica and every node's metrics agent exports them (what a cluster's Prometheus scrapes)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self.tokens = Counter("onspec_replica_completion_tokens", "generated tokens", tag_keys=("label",))
        self.drafted = Counter("onspec_replica_draft_tokens", "drafted tokens", tag_keys=("label",))
        self.accepted = Counter("onspec_replica_accepted_tokens", "accepted draft tokens", tag_keys=("label",))
        self.written = Gauge("onspec_replica_stream_records_written", "records Redis acknowledged (running total)")
        self.dropped = Gauge("onspec_replica_stream_records_dropped", "records dropped, buffer full (running total)")
        self.pending = Gauge("onspec_replica_stream_records_pending", "records waiting for Redis")
        self.labels: set[str] = set()

    def finished(self, label: str | None, usage: dict, replica: dict) -> None:
        from onspec.cluster.api.metrics import MAX_METRIC_LABELS

        label = label or ""
        if label not in self.labels:  # bounded series, as on the ingress
            if len(self.labels) >= MAX_METRIC_LABELS:
                label = "other"
            else:
                self.labels.add(label)
        tags = {"label": label}
        for counter, key in ((self.tokens, "completion_tokens"), (self.drafted, "drafted_tokens"),
                             (self.accepted, "accepted_tokens")):
            if usage[key] > 0:  # Ray's Counter.inc refuses 0
                counter.inc(usage[key], tags)
        log = replica.get("logger")
        if log:
            self.written.set(log["written"])
            self.dropped.set(log["dropped"])
            self.pending.set(log["pending"])


class ApiDeployment:
    def __init__(self, cfg: dict, engine):
        self.cfg = OnspecConfig.model_validate(cfg)
        self.backend = HandleBackend(engine)

    def __serve_build_asgi_app__(self):
        from onspec.cluster.api import create_app
        return create_app(self.cfg, self.backend)


def build_app(cfg: OnspecConfig, stream_enabled: bool | None = None, version: str | None = None,
              speculate: bool = True):
    """The Serve application for ``cfg`` (``cfg.redis.url`` must already point at a running Redis, or be None
    for no stream at all). Deploying it again with the same ``version`` and only ``stream_enabled`` changed
    updates the running replicas in place (``reconfigure``) instead of replacing them."""
    from ray import serve

    s = cfg.server
    data = cfg.wire()  # secrets included (a plain dump masks them): the deployments need the Redis password
    engine = serve.deployment(
        EngineDeployment, name="onspec-engine", num_replicas=s.replicas,
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.replica_cpus},
        # Generation can be slow on a CPU: do not let health checks kill a busy replica.
        health_check_timeout_s=120, graceful_shutdown_timeout_s=10,
        user_config={"stream_enabled": cfg.stream.enabled if stream_enabled is None else stream_enabled,
                     "speculate": speculate},
    )
    api = serve.deployment(serve.ingress()(ApiDeployment), name="onspec-api", num_replicas=1,
                           max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    if version:
        # serve.run gives every deployment a random code version, so any redeploy replaces the replicas (and
        # reloads the model). Ray keeps a fixed one here, but only as a private attribute (the public `version`
        # option was removed); the version must change whenever the code or anything but user_config does.
        engine._version = api._version = version
    return api.bind(data, engine.bind(data))


class ServeError(RuntimeError):
    pass


def with_redis_password(cfg: OnspecConfig) -> OnspecConfig:
    """The one place Redis clients get the password: it goes into ``redis.url``, which every client of the cluster
    (stream logger, trainer, registry, hot-swap watcher, dashboard history) connects with. Never log that URL:
    ``shown_url`` strips it."""
    from onspec.cluster.kuberay import with_password

    password = cfg.redis.resolved_password()
    if not (password and cfg.redis.url):
        return cfg
    return cfg.merged(**{"redis.url": with_password(cfg.redis.url, password)})


def shown_url(url: str | None) -> str | None:
    """``url`` without its credentials, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _check_port_free(host: str, port: int) -> None:
    """Fail fast with a clear message: Ray's proxy would only log the bind failure and keep retrying."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _absolute_paths(cfg: OnspecConfig) -> OnspecConfig:
    """Replicas do not run in this process's working directory: relative paths are resolved here."""
    def resolve(p):
        return str(Path(p).resolve()) if p is not None else None

    return cfg.merged(**{"data_dir": resolve(cfg.data_dir), "redis.dir": resolve(cfg.redis.dir),
                         "server.api_key_file": resolve(cfg.server.api_key_file),
                         "server.admin_key_file": resolve(cfg.server.admin_key_file),
                         "redis.password_file": resolve(cfg.redis.password_file),
                         "drafter.checkpoint": resolve(cfg.drafter.checkpoint),
                         "model.gguf_path": resolve(cfg.model.gguf_path)})


class Cluster:
    """Ray (local or joined), the private redis-server when no URL is given, and the Serve app."""

    def __init__(self, cfg: OnspecConfig, ray_temp_dir: str | None = None, trainer_journal: str | None = None):
        self.cfg = cfg
        self.ray_temp_dir = ray_temp_dir
        self.trainer_journal = trainer_journal  # actors/journal.py, for the fault benches and tests
        self.redis = None
        self.trainer = None  # the TrainerActor handle, when cfg.trainer.enabled
        self.started_ray = False
        self.version = uuid.uuid4().hex  # one per start: a redeploy from this object changes only user_config

    def start(self) -> "Cluster":
        import ray
        from ray import serve

        cfg = self.cfg = _absolute_paths(self.cfg)
        _check_port_free(cfg.server.host, cfg.server.port)
        # Secret files are read now: a missing or empty one fails here, not later inside a deployment.
        cfg.server.keys()
        password = cfg.redis.resolved_password()
        if cfg.redis.url is None and cfg.stream.enabled:
            from onspec.cluster.redis_server import RedisServer
            rdir = cfg.redis.dir or Path(cfg.data_dir) / "redis"
            self.redis = RedisServer(rdir, cfg.redis.port, password=password).start()
            cfg = self.cfg = cfg.merged(**{"redis.url": self.redis.url})
            log.info("private redis-server at %s (data in %s)", self.redis.url, rdir)
        cfg = self.cfg = with_redis_password(cfg)
        try:
            if not ray.is_initialized():
                if cfg.server.ray_address:
                    ray.init(address=cfg.server.ray_address, log_to_driver=False)
                else:
                    need = cfg.server.replicas * cfg.server.replica_cpus + self._trainer_cpus()
                    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                             include_dashboard=False, log_to_driver=False, _temp_dir=self.ray_temp_dir)
                self.started_ray = True
            serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
            serve.run(build_app(cfg, version=self.version), name=APP_NAME, route_prefix="/")
            if self._trainer_cpus() and cfg.redis.url:
                self.start_trainer()
        except BaseException:
            self.stop()
            raise
        return self

    def _trainer_cpus(self) -> float:
        return self.cfg.trainer.cpus if self.cfg.trainer.enabled and self.cfg.stream.enabled else 0.0

    def start_trainer(self):
        """The online trainer as a Ray actor (actors/trainer.py); it reads the stream the replicas write."""
        import ray

        from onspec.actors.trainer_actor import TrainerActor

        if not self.cfg.redis.url:
            raise ServeError("the trainer needs Redis (the rejection stream and the drafter registry)")
        actor = ray.remote(TrainerActor).options(name="onspec-trainer", num_cpus=self.cfg.trainer.cpus,
                                                 max_restarts=3, max_task_retries=0)
        self.trainer = actor.remote(self.cfg.wire(), self.trainer_journal)
        ray.get(self.trainer.state.remote(), timeout=600)  # built: model loaded, group joined
        return self.trainer

    def trainer_call(self, method: str, *args, timeout: float = 300):
        import ray

        if self.trainer is None:
            raise ServeError("no trainer is running (trainer.enabled is false or the stream is off)")
        return ray.get(getattr(self.trainer, method).remote(*args), timeout=timeout)

    def stop_trainer(self) -> None:
        import ray

        if self.trainer is not None:
            try:
                ray.get(self.trainer.stop.remote(), timeout=60)
            except Exception:  # already gone: nothing to stop
                pass
            ray.kill(self.trainer)
            self.trainer = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.server.host}:{self.cfg.server.port}"

    def set_stream_enabled(self, enabled: bool) -> None:
        """Switch rejection logging on every replica in place (a user_config update, no restart)."""
        self._switch(stream_enabled=enabled)

    def set_speculation(self, enabled: bool) -> None:
        """Switch speculative decoding on every replica in place (off: target-only, the benchmarks' baseline)."""
        self._switch(speculate=enabled)

    def _switch(self, **switches) -> None:
        from ray import serve

        self.switches = {**getattr(self, "switches", {}), **switches}
        serve.run(build_app(self.cfg, version=self.version, **self.switches), name=APP_NAME, route_prefix="/")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                self.stop_trainer()
                serve.shutdown()
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()
