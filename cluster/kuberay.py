"""The Serve application builder for KubeRay (the Helm chart in helm/onspec renders it into a RayService).

A RayService's ``serveConfigV2`` names this builder and passes it the chart's values as the one typed config::

    applications:
      - name: onspec
        import_path: onspec.cluster.kuberay:build
        route_prefix: /
        args:
          config: {...}                      # OnspecConfig as a dict (the chart's `onspec:` values, mapped)
          redis_password_env: REDIS_PASSWORD # optional: the env var that holds the Redis password
          trainer_resources: {onspec_trainer: 1}  # optional: custom Ray resources of the trainer actor

KubeRay runs the builder inside the Ray cluster (Ray is already initialised there). It validates the config,
puts the Redis password into ``redis.url`` (read from the env var that ``redis_password_env`` names: as in the rest
of the project no module reads an env var on its own; the caller names it), starts the online trainer as a named
detached actor when none runs, and returns ``build_app(cfg)``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional
from urllib.parse import quote, urlsplit, urlunsplit

from onspec.actors.config import OnspecConfig

log = logging.getLogger("onspec.kuberay")

TRAINER_NAME = "onspec-trainer"  # the name HandleBackend.trainer() looks up (cluster/serve.py)
SERVE_NAMESPACE = "serve"  # Ray Serve's replicas run in this namespace; the API finds the trainer there

# Fields the chart sets itself (pod paths, the Serve proxy, the in-cluster Redis, the key files mounted from the
# chart's Secrets); not chart values. Secrets never are: values end up in the RayService, readable by anyone who can
# read the custom resource.
CHART_MANAGED = {"data_dir": None,
                 "server": ("host", "port", "ray_address", "api_keys", "admin_keys", "api_key_file", "admin_key_file"),
                 "redis": ("url", "dir", "port", "password", "password_file")}


class KubeRayConfigError(ValueError):
    pass


def with_password(url: str, password: Optional[str]) -> str:
    """``url`` with ``password`` as its credentials, unless it already carries some (or there is none)."""
    if not password:
        return url
    parts = urlsplit(url)
    if parts.password or "@" in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))


def resolve_config(config: Mapping[str, Any] | None, redis_password_env: Optional[str] = None,
                   environ: Mapping[str, str] | None = None) -> OnspecConfig:
    """Validate the chart's config dict and put the Redis password (from the named env var) into the URL."""
    cfg = OnspecConfig.model_validate(dict(config or {}))
    if redis_password_env and cfg.redis.url:
        env = os.environ if environ is None else environ
        cfg = cfg.merged(**{"redis.url": with_password(cfg.redis.url, env.get(redis_password_env))})
    if cfg.stream.enabled and not cfg.redis.url:
        # Cluster.start would run a private redis-server; in a RayService nothing would share it.
        raise KubeRayConfigError("on KubeRay the rejection stream needs redis.url (the chart's Redis or an "
                                 "external one); or set stream.enabled: false")
    return cfg


def wants_trainer(cfg: OnspecConfig) -> bool:
    return bool(cfg.trainer.enabled and cfg.stream.enabled and cfg.redis.url)


def trainer_options(cfg: OnspecConfig, resources: Mapping[str, float] | None = None) -> dict:
    """Ray actor options of the trainer: those of Cluster.start_trainer, detached and in Serve's namespace so
    that it outlives the build task and the API deployment finds it by name."""
    opts = {"name": TRAINER_NAME, "namespace": SERVE_NAMESPACE, "lifetime": "detached", "get_if_exists": True,
            "num_cpus": cfg.trainer.cpus, "max_restarts": 3, "max_task_retries": 0}
    if resources:
        opts["resources"] = dict(resources)
    return opts


def ensure_trainer(cfg: OnspecConfig, resources: Mapping[str, float] | None = None):
    """Start the trainer actor unless one runs already (a Serve config update rebuilds the app, not the
    trainer). Does not wait for it to load: the build must not block on the model."""
    import ray

    from onspec.actors.trainer_actor import TrainerActor

    try:
        return ray.get_actor(TRAINER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        pass
    actor = ray.remote(TrainerActor).options(**trainer_options(cfg, resources)).remote(cfg.wire())
    log.info("started the trainer actor %s", TRAINER_NAME)
    return actor


def build(args: dict):
    """KubeRay's entry point (``import_path: onspec.cluster.kuberay:build``)."""
    from onspec.cluster.serve import build_app

    args = dict(args or {})
    unknown = set(args) - {"config", "redis_password_env", "trainer_resources"}
    if unknown:
        raise KubeRayConfigError(f"unknown builder args: {sorted(unknown)}")
    cfg = resolve_config(args.get("config"), args.get("redis_password_env"))
    if wants_trainer(cfg):
        ensure_trainer(cfg, args.get("trainer_resources"))
    return build_app(cfg)


def chart_values_schema() -> dict:
    """The JSON schema of the chart's ``onspec:`` values: OnspecConfig's, inlined (no $ref), strict, minus the
    fields the chart manages. helm/onspec/values.schema.json holds it (tests/test_helm.py checks they agree)."""
    schema = OnspecConfig.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].split("/")[-1]])
            return {k: inline(v) for k, v in node.items() if k not in ("title", "format")}
        if isinstance(node, list):
            return [inline(x) for x in node]
        return node

    out = inline(schema)
    for key, fields in CHART_MANAGED.items():
        if fields is None:
            out["properties"].pop(key)
        else:
            for f in fields:
                out["properties"][key]["properties"].pop(f)
    return out


def chart_values_defaults() -> dict:
    """OnspecConfig's defaults as the chart's ``onspec:`` values (chart-managed fields left out)."""
    data = OnspecConfig().model_dump(mode="json")
    for key, fields in CHART_MANAGED.items():
        if fields is None:
            data.pop(key)
        else:
            for f in fields:
                data[key].pop(f)
    return data
